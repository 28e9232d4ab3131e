"""Tests for sampling and generation."""
