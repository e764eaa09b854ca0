"""Specialist models of stage 1: each module is one annotator family, a Stage."""
