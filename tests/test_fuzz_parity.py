"""qimg beside qemu-img on mutated qcow2 images (tests/fuzzing.py).

Every mutant (a qemu-made seed with a recipe of mutations applied) goes
through info, check and convert with both tools. A test fails on a qimg
traceback or internal error, a hang, a multi-line error, a success or exit
code that differs from qemu-img's (where qemu-img neither crashed nor hung),
data that differs, or info JSON that differs on the keys scripts read.

The corpus (tests/fuzz_corpus/*.json, recipes that once diverged) is
replayed every run; then a bounded random run with a fixed seed.
"""

from __future__ import annotations

import pytest
from fuzzing import (
    SEEDS,
    RecipeError,
    corpus_recipes,
    make_seed,
    random_recipes,
    read_seed,
    run_mutant,
)

# The random run: RANDOM_COUNT mutants from the fixed RANDOM_SEED (one test
# each, so pytest-xdist spreads them and each reports alone).
RANDOM_SEED = 20261205
RANDOM_COUNT = 100


@pytest.fixture(scope="session")
def fuzz_seeds(tmp_path_factory, qemu_img, qemu_io):
    root = tmp_path_factory.mktemp("fuzz-seeds")
    return {name: read_seed(name, make_seed(name, root / name)) for name in SEEDS}


@pytest.fixture(scope="session")
def fuzz_recipes(fuzz_seeds):
    return random_recipes(fuzz_seeds, RANDOM_SEED, RANDOM_COUNT)


def _assert_same_as_qemu(seeds, recipe: dict, work) -> None:
    try:
        result = run_mutant(seeds[recipe["seed"]], recipe, work)
    except RecipeError as e:
        pytest.skip(f"the seed made by this qemu-img has no {e}")
    if result.failures():
        pytest.fail(result.report(), pytrace=False)


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_unmutated_seed_behaves_as_qemu_img(seed, fuzz_seeds, tmp_path):
    # The harness's baseline: on the valid images it mutates, every command
    # agrees with qemu-img (a finding here is a harness or a seed defect).
    result = run_mutant(fuzz_seeds[seed], {"seed": seed, "mutations": []}, tmp_path / "work")
    if result.findings:
        pytest.fail(result.report(all_findings=True), pytrace=False)


@pytest.mark.parametrize(
    "recipe", [r for _, r in corpus_recipes()], ids=[n for n, _ in corpus_recipes()]
)
def test_corpus_mutant_behaves_as_qemu_img(recipe, fuzz_seeds, tmp_path):
    _assert_same_as_qemu(fuzz_seeds, recipe, tmp_path / "work")


@pytest.mark.parametrize("index", range(RANDOM_COUNT))
def test_random_mutant_behaves_as_qemu_img(index, fuzz_recipes, fuzz_seeds, tmp_path):
    _assert_same_as_qemu(fuzz_seeds, fuzz_recipes[index], tmp_path / "work")
