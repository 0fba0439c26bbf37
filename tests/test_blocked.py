"""Blocked PyTorch path (backend="torch") against the dense fp64 reference: forward and every gradient."""
import pytest

from cases import BLOCKED_PAPER as PAPER
from cases import blocked_id as case_id
from cases import blocked_with, check_case, covering_cases

CASES = covering_cases(200)


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_blocked_matches_reference(c):
    check_case(c)


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs(name):
    causal, w, r, chunk, N, H, D = PAPER[name]
    check_case(dict(causal=causal, w=w, r=r, chunk=chunk, N=N, H=H, D=D, B=1, pad="none",
                    lnL="shared", lnG="shared", after=not causal))  # LRA code projects after LN, char-LM before


GROUPED = dict(causal=True, B=2, H=3, N=63, D=8, w=3, r=2, chunk=4, pad="rows", lnL="shared", lnG="head", after=False)
ELEMS_PER_QUERY = 2 * 3 * (63 // 4) * 2  # B * H * n_chunks * r: causal projected scores per query


def test_causal_global_query_groups():
    """Long causal inputs are scored in checkpointed query groups; force groups of 3 chunks at N = 63."""
    check_case(GROUPED, blocked_with(causal_global_elems=ELEMS_PER_QUERY * 12))


def test_causal_global_query_groups_of_one_chunk():
    check_case(GROUPED, blocked_with(causal_global_elems=ELEMS_PER_QUERY * 4))
