"""Benchmark scripts: print timings and memory; meant to be run alone on an idle machine."""
