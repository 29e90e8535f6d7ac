"""The only part of raytitan that imports Ray: the driver (``launcher``), the workers' Ray
runtime, the data feeder actors and the driver's progress display."""
