"""Segmentation datasets: the built-in synthetic set, local folders and the Hub."""
