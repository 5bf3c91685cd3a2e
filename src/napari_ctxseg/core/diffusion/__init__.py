"""EDM diffusion: preconditioning, noise levels, solvers, and the tiled and flip-averaged denoisers."""
