"""Tests of the test kit, tampu.testing (what plugin authors get)."""
