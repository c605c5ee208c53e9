"""The private PostgreSQL cluster of the tests (``gasnap.lab.pgcluster``)."""

from gasnap.lab.pgcluster import Cluster, private_cluster

__all__ = ["Cluster", "private_cluster"]
