"""OPQNIndex.search among a subset of ids (``subset=``) against a search of every item, one query,
top-10: what restricting a 10M-item index to a list of ids costs (the ids are sorted and looked up,
then their codes gathered and scanned), and a search of ``index.restricted(subset)``, the index of
the subset's items made once for many searches.

The index holds N random 32-bit codes (8 books x 16 words) under ids 0, 2, 4, ...; each subset is
random ids, half of them in the index. Results are checked first against adc_topk over the codes
of the subset's items.

    python benchmarks/bench_subset_search.py [--size 10000000] [--json PATH]
"""
import argparse
import platform

import torch

import opqn_ext
from bench_adc import median_seconds, write_results
from opqn_ext.index import OPQNIndex
from opqn_ext.nn import OrthoPQHead

D, M, K = 512, 8, 16
SUBSETS = (1_000, 100_000, 1_000_000)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--json")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    index = OPQNIndex.from_head(OrthoPQHead(D, 5, M, K, seed=0))
    n = args.size
    index.add_codes(torch.randint(0, K, (n, M), dtype=torch.uint8, generator=g), ids=torch.arange(n) * 2)
    query = torch.randn(1, D, generator=g)
    full = median_seconds(lambda: index.search(query, 10), 5)
    rows = [{"subset": None, "items": n, "ms": full * 1e3}]
    print(f"{'subset ids':>10} {'items':>9} | {'ms':>8} {'x every item':>12} {'restricted ms':>13}")
    print(f"{'-':>10} {n:>9} | {full * 1e3:>8.2f} {1.0:>12.2f} {'-':>13}")
    for size in SUBSETS:
        subset = torch.randperm(2 * n, generator=g)[:size]
        held = torch.unique(subset[torch.isin(subset, index.ids)])
        want_scores, want_pos = opqn_ext.adc_topk(index.query_lut(query), index.codes[held // 2], 10)
        scores, ids = index.search(query, 10, subset=subset)
        assert torch.equal(ids, held[want_pos]) and torch.equal(scores, want_scores), "subset search differs"
        seconds = median_seconds(lambda: index.search(query, 10, subset=subset), 5)
        part = index.restricted(subset)
        reused = median_seconds(lambda: part.search(query, 10), 5)
        rows.append({"subset": size, "items": len(held), "ms": seconds * 1e3, "x_every_item": seconds / full,
                     "restricted_ms": reused * 1e3})
        print(f"{size:>10} {len(held):>9} | {seconds * 1e3:>8.2f} {seconds / full:>12.2f} {reused * 1e3:>13.2f}")
    write_results(args.json, "subset_search.json",
                  {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "rows": rows})


if __name__ == "__main__":
    main()
