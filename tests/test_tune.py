"""`nanodrz tune`: the expensive stage decoded once (and cached without pickle), trials replayed by Optuna.

Uses the tone diarizer of test_diarize (tones as voices, one-hot "embeddings").
"""

from __future__ import annotations

import numpy as np
import soundfile as sf

from nanodrz.annotation import Turn, write_rttm
from nanodrz.params import DiarizationSettings, PipelineParams, search_space
import nanodrz.tune
from nanodrz.tune import (RULES_OFF, Scores, decode_sets, evaluate, load_chunk_outputs, retire_rules,
                          save_chunk_outputs, trial_values, tune)

from test_diarize import SR, tone_audio, tone_diarizer

REFERENCE = [(0.5, 2.5, 0), (3.0, 5.0, 1), (6.5, 8.0, 0), (8.5, 10.0, 1)]


def write_set(folder, name: str, audio: np.ndarray, turns: list[Turn]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / f"{name}.wav", audio, SR)
    write_rttm(folder / f"{name}.rttm", {name: turns})


def sets(tmp_path):
    speech = [Turn(start, end, "AB"[voice]) for start, end, voice in REFERENCE]
    write_set(tmp_path / "tones", "a", tone_audio(REFERENCE, 11.0), speech)
    write_set(tmp_path / "tones", "b", tone_audio(REFERENCE[:2], 6.0), speech[:2])
    rng = np.random.default_rng(0)
    write_set(tmp_path / "noise", "n", (0.1 * rng.standard_normal(4 * SR)).astype(np.float32), [])
    return [tmp_path / "noise", tmp_path / "tones"]


def test_the_decoded_sets_replay_and_survive_the_cache(tmp_path):
    found = decode_sets(tone_diarizer(), sets(tmp_path), batch_size=2, cache=None)
    assert sorted(found) == ["noise", "tones"] and [r.name for r in found["tones"]] == ["a", "b"]
    params, settings = PipelineParams(), DiarizationSettings()
    for recording in found["tones"]:
        path = tmp_path / "cache" / f"{recording.name}.npz"
        save_chunk_outputs(path, recording.outputs)
        assert load_chunk_outputs(path).finish(params, settings) == recording.outputs.finish(params, settings)
    scores = evaluate(found, params, quiet_sets={"noise"})
    assert scores.per_set["tones"] < 5.0 and scores.mean_der == scores.per_set["tones"]
    assert scores.worst_false_alarm == scores.per_set["noise"] >= 0.0


def test_a_set_simulated_again_is_decoded_again_not_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(nanodrz.tune, "expensive_stage_key", lambda diarizer: "tones")  # no torch weights
    diarizer = tone_diarizer()
    calls = []
    decode = diarizer.chunk_outputs_many
    monkeypatch.setattr(diarizer, "chunk_outputs_many",
                        lambda items, **kw: calls.append(len(items)) or decode(items, **kw))
    folders = sets(tmp_path)
    first = decode_sets(diarizer, folders, batch_size=2, cache=tmp_path / "cache")
    again = decode_sets(diarizer, folders, batch_size=2, cache=tmp_path / "cache")
    assert calls == [1, 2, 0, 0]
    assert [r.outputs.finish(PipelineParams(), DiarizationSettings()) for r in again["tones"]] == \
        [r.outputs.finish(PipelineParams(), DiarizationSettings()) for r in first["tones"]]
    speech = [Turn(start, end, "AB"[voice]) for start, end, voice in REFERENCE[:1]]
    write_set(tmp_path / "tones", "b", tone_audio(REFERENCE[:1], 6.0), speech)  # same name, new audio
    decode_sets(diarizer, folders, batch_size=2, cache=tmp_path / "cache")
    assert calls[4:] == [0, 1]


def test_the_first_trial_is_the_current_parameters_so_tuning_never_loses(tmp_path):
    found = decode_sets(tone_diarizer(), sets(tmp_path), batch_size=2, cache=None)
    base = PipelineParams().with_values({"merge.threshold": 0.95, "refine.passes": 1})
    values = trial_values(base, search_space(base))
    assert values["merge.threshold"] == 0.95 and values["resegment.speech_threshold:on"] is True
    chosen, measured = tune(found, base, {"noise"}, trials=4, seed=0, max_false_alarm=1e6, frozen={"refine.passes"})
    assert len(measured) == 4 and measured[0][0] == base
    assert chosen.refine.passes == 1  # frozen
    assert evaluate(found, chosen, {"noise"}).mean_der <= evaluate(found, base, {"noise"}).mean_der


def test_rules_that_cost_nothing_are_retired_and_rules_that_help_stay(monkeypatch):
    """Scores stand in for validation: merging lowers DER by a point, the gate keeps noise silent, island
    removal takes noise from 0.7 to 0.5 s/min (under any limit, but a gain), the rest change nothing."""
    def fake_evaluate(found, params, quiet_sets):
        der = 10.0 + (1.0 if params.merge.threshold is None else 0.0)
        false_alarm = 5.0 if params.resegment.nonspeech_threshold is None else 0.5
        false_alarm += 0.2 if params.resegment.min_island_seconds == 0 else 0.0
        return Scores({"noise": false_alarm}, {}, der, false_alarm)

    monkeypatch.setattr(nanodrz.tune, "evaluate", fake_evaluate)
    chosen, retired = retire_rules({}, PipelineParams(), {"noise"})
    kept = ("voice merging", "segmentation-3.0 gate", "short-island removal")
    assert retired == [rule for rule in RULES_OFF if rule not in kept]
    assert chosen.merge.threshold is not None and chosen.resegment.nonspeech_threshold is not None
    assert chosen.resegment.min_island_seconds > 0
    assert chosen.refine.passes == 0 and chosen.absorb.min_label_seconds == 0.0


def test_retiring_a_harmful_rule_lowers_der_on_real_decodes(tmp_path):
    found = decode_sets(tone_diarizer(), sets(tmp_path), batch_size=2, cache=None)
    merge_everything = PipelineParams().with_values({"merge.threshold": -1.0})
    chosen, retired = retire_rules(found, merge_everything, {"noise"})
    assert "voice merging" in retired and chosen.merge.threshold is None
    assert evaluate(found, chosen, {"noise"}).mean_der < evaluate(found, merge_everything, {"noise"}).mean_der
