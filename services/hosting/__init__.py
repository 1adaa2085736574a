"""What every service that holds an engine shares: loading it from the model spec, and stepping it
off the event loop with the threads the cores allow (``engines``, ``threads``)."""
