"""Running the services: one service per process until a signal (``runner``), every service in
one process (``embedded``), a supervised local mesh of processes (``launcher``), and loading the
engine a worker drives (``engines``)."""
