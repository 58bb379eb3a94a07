"""Stage two: DDPO over denoising trajectories."""
