"""OPQNIndex under random sequences of adds (ids in any order), merges of indexes built apart,
removes, saves and loads (mapped or read), checked after every step against a plain model of what it holds (id -> code, label): every
kind of search (exact, 4-bit, among a subset, by range), labels and reconstructed vectors. The
tables have small integer values, so sums are exact and ties common."""
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import opqn_ext
from opqn_ext.index import OPQNIndex
from opqn_ext.nn import OrthoPQHead

M, d, K = 3, 16, 16
ID_RANGE = 400


def brute_topk(luts: torch.Tensor, ids: list[int], codes: torch.Tensor, k: int):
    """(scores, ids) of the model: every score, ranked by score descending, then smaller id; places
    beyond the items hold score -inf and id -1."""
    scores = opqn_ext.adc_scores(luts, codes)  # [nq, n]
    ranked = [sorted(range(len(ids)), key=lambda j: (-float(row[j]), ids[j]))[:k] for row in scores]
    pad = k - len(ranked[0])
    return (torch.stack([torch.cat([row[r], torch.full((pad,), float("-inf"))]) for row, r in zip(scores, ranked)]),
            torch.tensor([[ids[j] for j in r] + [-1] * pad for r in ranked], dtype=torch.int64))


class IndexMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.head = OrthoPQHead(M * d, 5, M, K, seed=0)
        self.index = OPQNIndex.from_head(self.head)
        self.held: dict[int, tuple[list[int], int]] = {}  # id -> (code, label)
        self.folder = Path(tempfile.mkdtemp(prefix="opqn_index_state"))
        self.saves = 0
        self.luts = torch.randint(0, 4, (3, M, K), generator=torch.Generator().manual_seed(0)).float()

    def teardown(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    def _model(self, subset=None):
        ids = sorted(i for i in self.held if subset is None or i in subset)
        codes = torch.tensor([self.held[i][0] for i in ids], dtype=torch.uint8).reshape(len(ids), M)
        return ids, codes

    @rule(data=st.data(), n=st.integers(0, 40), labeled=st.booleans())
    def add(self, data, n, labeled):
        free = [i for i in range(ID_RANGE) if i not in self.held]
        ids = data.draw(st.lists(st.sampled_from(free), min_size=min(n, len(free)), max_size=min(n, len(free)),
                                 unique=True)) if free else []
        codes = data.draw(st.lists(st.lists(st.integers(0, K - 1), min_size=M, max_size=M), min_size=len(ids),
                                   max_size=len(ids)))
        labels = [i % 7 if labeled else -1 for i in ids]
        added = self.index.add_codes(torch.tensor(codes, dtype=torch.uint8).reshape(len(ids), M), ids=ids,
                                     labels=labels if labeled else None)
        assert added.tolist() == ids
        self.held |= {i: (c, lab) for i, c, lab in zip(ids, codes, labels)}

    @rule(data=st.data(), n=st.integers(0, 30), offset=st.integers(-50, 50))
    def merge(self, data, n, offset):
        """merge_from an index of other items, built apart and saved; ids moved by ``offset``."""
        free = [i for i in range(ID_RANGE) if i not in self.held and 0 <= i - offset < ID_RANGE]
        ids = data.draw(st.lists(st.sampled_from(free), min_size=min(n, len(free)), max_size=min(n, len(free)),
                                 unique=True)) if free else []
        codes = data.draw(st.lists(st.lists(st.integers(0, K - 1), min_size=M, max_size=M), min_size=len(ids),
                                   max_size=len(ids)))
        other = OPQNIndex.from_head(self.head)
        other.add_codes(torch.tensor(codes, dtype=torch.uint8).reshape(len(ids), M),
                        ids=[i - offset for i in ids], labels=[i % 5 for i in ids])
        other.save(self.folder / "other.opqn")
        other = OPQNIndex.load(self.folder / "other.opqn", mmap=data.draw(st.booleans()))
        held_there = [i - offset for i in sorted(self.held) if i - offset != -1]  # -1 is no item's id
        if held_there and ids:  # an id held already: refused, nothing added
            clash = OPQNIndex.from_head(self.head)
            clash.add_codes(torch.zeros(1, M, dtype=torch.uint8), ids=held_there[:1])
            with pytest.raises(ValueError, match="other holds ids this index holds already"):
                self.index.merge_from(clash, id_offset=offset)
        assert self.index.merge_from(other, id_offset=offset).tolist() == sorted(ids)
        self.held |= {i: (c, i % 5) for i, c in zip(ids, codes)}

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def remove(self, data):
        gone = data.draw(st.lists(st.sampled_from(sorted(self.held)), max_size=30))
        other = data.draw(st.lists(st.integers(ID_RANGE, 2 * ID_RANGE), max_size=3))  # ids no item has
        assert self.index.remove(gone + other) == len(set(gone))
        for i in gone:
            self.held.pop(i, None)

    @rule(mmap=st.booleans(), verify=st.booleans())
    def save_and_load(self, mmap, verify):
        self.saves += 1
        path = self.folder / f"index{self.saves % 2}.opqn"  # every other save replaces a file
        self.index.save(path)
        self.index = OPQNIndex.load(path, mmap=mmap, verify=verify)

    @rule(data=st.data(), fast_scan=st.booleans())
    def search(self, data, fast_scan):
        k = data.draw(st.integers(1, len(self.held) + 3))  # beyond the items: padded
        ids, codes = self._model()
        rerank = len(ids) // k + 1  # every code re-scored: the 4-bit scan must be exact
        scores, found = self.index.search_luts(self.luts, k, fast_scan=fast_scan, rerank=rerank)
        want_scores, want_ids = brute_topk(self.luts, ids, codes, k)
        assert torch.equal(found, want_ids) and torch.equal(scores, want_scores)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def search_a_subset(self, data):
        subset = data.draw(st.lists(st.integers(0, ID_RANGE), min_size=1, max_size=60))  # any order, repeats
        ids, codes = self._model(set(subset))
        k = data.draw(st.integers(1, len(ids) + 3))  # beyond the subset's items (maybe none): padded
        scores, found = self.index.search_luts(self.luts, k, subset=subset)
        want_scores, want_ids = brute_topk(self.luts, ids, codes, k)
        assert torch.equal(found, want_ids) and torch.equal(scores, want_scores)

    @rule(seed=st.integers(0, 3), quantile=st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    def range_search(self, seed, quantile):
        queries = torch.randn(2, M * d, generator=torch.Generator().manual_seed(seed))
        ids, codes = self._model()
        every = opqn_ext.adc_scores(self.index.query_lut(queries), codes)  # [2, n]
        threshold = float(every.quantile(quantile)) if len(ids) else 0.0
        lims, scores, found = self.index.range_search(queries, threshold)
        for q in range(2):
            keep = sorted((j for j in range(len(ids)) if every[q, j] >= threshold),
                          key=lambda j: (-float(every[q, j]), ids[j]))
            assert found[lims[q]:lims[q + 1]].tolist() == [ids[j] for j in keep]
            assert torch.equal(scores[lims[q]:lims[q + 1]], every[q, keep])

    @invariant()
    def holds_what_was_added(self):
        assert len(self.index) == len(self.held)
        assert self.index.ids.tolist() == sorted(self.held)
        asked = torch.tensor(sorted(self.held)[:20] + [ID_RANGE + 1], dtype=torch.int64)
        assert self.index.labels_of(asked).tolist() == [self.held[i][1] for i in asked[:-1].tolist()] + [-1]
        if self.held:
            first = sorted(self.held)[:5]
            words = self.index.codebook.transpose(1, 2)  # [M, K, d]
            want = torch.stack([torch.cat([words[m, self.held[i][0][m]] for m in range(M)]) for i in first])
            assert torch.equal(self.index.reconstruct(first), want)


IndexMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
test_index_under_random_changes = IndexMachine.TestCase
