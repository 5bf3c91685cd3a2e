"""Flow fields: masks to flows, flow following, post-processing, and flows to labels in 2D and 3D."""
