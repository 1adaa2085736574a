"""ExeGPT mesh services: gateway, encoder, decoder, scheduler, and the command line."""
