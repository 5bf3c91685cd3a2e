"""Instance segmentation metrics: overlaps, matching and scores."""
