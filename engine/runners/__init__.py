"""Runner adapters: the only modules that import ray or apache_beam."""
