"""Write the reference workload (OpenAI batch JSONL): see spendwarden/devtools/workload.py.

    python bench/workload/make.py -o bench/results/reference.jsonl [--requests 3000] [--seed 7] [--days 3]
"""
import sys

from spendwarden.devtools.workload import main

if __name__ == "__main__":
    sys.exit(main())
