"""The real Gemma-3-270M Q4_K_M on 64 SST-2 dev rows (slower: a few seconds per pass on 2 cores)."""

import numpy as np
import pytest

from ggfwd.adapter import LoraAdapter
from ggfwd.session import Session
from ggfwd.tasks import load_examples, load_task, tokenize_examples

pytestmark = pytest.mark.slow


def test_gemma_sst2_dev_64(gemma_model, sst2):
    task = load_task("sst2-plain")
    examples = load_examples(sst2["dev"], task, limit=64)
    with Session(gemma_model, max_seqs=16, seq_tokens=128, batch_tokens=1024) as s:
        assert s.base.arch == "gemma3" and s.base.tied_embeddings
        data = tokenize_examples(examples, task, s.tokenize, s.detokenize, 128)
        assert [len(s.tokenize(w, False)) for w in task.verbalizers] == [1, 1]
        plan = s.plan(data)
        assert len(plan.chunks) == 4
        scores = s.score(plan)
        assert np.isfinite(scores.losses).all() and (scores.losses > 0).all()
        assert scores.correct.sum() == int(round(scores.accuracy * 64))
        # The two classes are roughly balanced here; zero-shot with the notes' plain prompt sits near chance.
        assert 0.2 <= scores.accuracy <= 0.8
        # The built-in sst2 prompt (chosen on train rows) starts from a clearly lower loss on these dev rows.
        chosen = load_task("sst2")
        chosen_scores = s.score(s.plan(tokenize_examples(examples, chosen, s.tokenize, s.detokenize, 128)))
        assert chosen_scores.loss < scores.loss - 0.1
        # One example alone gives (almost) the same loss as inside a batch of 16.
        alone = s.score(s.plan(data.subset([5]))).losses[0]
        assert alone == pytest.approx(scores.losses[5], abs=0.05)
        # A zero-B adapter changes nothing; the adapter path itself is exact.
        s.set_adapter(LoraAdapter.create(s.base, rank=8, seed=0))
        assert s.score(plan).losses.tobytes() == scores.losses.tobytes()
