"""Pytest configuration: the tests import the installed package, never the ComfyUI pack root."""
from __future__ import annotations

import os
import sys

# tests/ holds helper modules (factories.py) imported by bare name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
