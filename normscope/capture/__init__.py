"""Capture: find normalization sites and record what flows through them."""

from normscope.capture.record import Site, SiteRecord
from normscope.capture.session import Capture, capture
from normscope.capture.sites import find_sites, find_unrecognized

__all__ = ["Capture", "Site", "SiteRecord", "capture", "find_sites", "find_unrecognized"]
