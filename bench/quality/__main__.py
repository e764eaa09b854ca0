"""`python -m bench.quality [--small | --gpu] ...`: see bench/quality/run.py."""
from bench.quality.run import main

if __name__ == "__main__":
    main()
