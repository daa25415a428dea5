"""What the sampler node and the service share: family, sampler and scheduler names (``names``, torch-free),
noise and latent formats (``latents``) and ComfyUI-exact schedules (``schedules``)."""
