"""`kvflow bench` and `kvflow env`: workloads, load generators, peers and the roofline that
judge every performance claim. Nothing here is on the serving path."""
