"""End-to-end tests run against the real control plane of tests/support/controlplane.py."""

from tests.support.controlplane import control_plane  # noqa: F401  (re-exported as fixtures)
from tests.support.operator import cluster, crds  # noqa: F401
