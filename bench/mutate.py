"""Mutation check: plausible mistakes in the core math, each of which the test suite must catch.

    .venv/bin/python bench/mutate.py            # every mutation: a table, the kill rate, exit 1 if one survives
    .venv/bin/python bench/mutate.py --list     # the mutations and the tests that should kill each
    .venv/bin/python bench/mutate.py --only dn-retrieval-means-swapped posterior-scale-dropped

A mutation is (name, file, snippet, replacement, tests): the snippet must occur exactly once in the file
(tests/test_mutations.py checks that on every run of the suite, so a refactor that moves a formula is
caught there). For each mutation the tracked files (`git ls-files`, working-tree contents: not .venv or
data) are copied to a temporary folder, the snippet is replaced, and the mutation's few tests run there
with PYTHONPATH set to the copy (`pytest -x -q -p no:cacheprovider`): a failing test kills it. First the
same tests run once on an unmutated copy, which must pass, or a "kill" would mean nothing.
One mutation at a time (the machine has 2 cores); the tests are chosen per mutation to keep the run short.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 1800  # seconds for one mutation's tests


class Mutation(NamedTuple):
    name: str
    file: str
    snippet: str
    replacement: str
    tests: tuple[str, ...]


EVALUATE = "tests/test_evaluate.py::"
SCORES = "tests/test_scores.py::"
LOSSES = "tests/test_losses.py::"
BY_KEY = "tests/test_score.py::test_the_loss_gets_each_samples_score_row_by_key"

MUTATIONS = [
    # ---- Distribution Normalization at evaluation (train/evaluate.py)
    Mutation("dn-zero-shot-means-swapped", "train/evaluate.py",
             "tokens(image - lam * means[0]), tokens(classes - lam * means[1])",
             "tokens(image - lam * means[1]), tokens(classes - lam * means[0])",
             (EVALUATE + "test_dn_zero_shot_subtracts_from_raw_features_then_normalises",)),
    Mutation("dn-zero-shot-text-shift-dropped", "train/evaluate.py",
             "tokens(image - lam * means[0]), tokens(classes - lam * means[1])",
             "tokens(image - lam * means[0]), tokens(classes)",
             (EVALUATE + "test_dn_zero_shot_subtracts_from_raw_features_then_normalises",)),
    Mutation("dn-zero-shot-not-renormalised", "train/evaluate.py",
             "tokens(image - lam * means[0]), tokens(classes - lam * means[1])",
             "image - lam * means[0], classes - lam * means[1]",
             (EVALUATE + "test_dn_zero_shot_subtracts_from_raw_features_then_normalises",)),
    Mutation("dn-zero-shot-default-lambda", "train/evaluate.py",
             "means: tuple[torch.Tensor, torch.Tensor] | None = None, lam: float = 0.5) -> dict:",
             "means: tuple[torch.Tensor, torch.Tensor] | None = None, lam: float = 0.25) -> dict:",
             (EVALUATE + "test_dn_zero_shot_subtracts_from_raw_features_then_normalises",)),
    Mutation("dn-retrieval-means-swapped", "train/evaluate.py",
             "image, text = image - lam * means[0], text - lam * means[1]",
             "image, text = image - lam * means[1], text - lam * means[0]",
             (EVALUATE + "test_dn_retrieval_is_the_formula_on_normalised_features",)),
    Mutation("dn-retrieval-renormalised", "train/evaluate.py",
             "image, text = image - lam * means[0], text - lam * means[1]",
             "image, text = tokens(image - lam * means[0]), tokens(text - lam * means[1])",
             (EVALUATE + "test_dn_retrieval_is_the_formula_on_normalised_features",)),
    Mutation("dn-retrieval-mean-added", "train/evaluate.py",
             "image, text = image - lam * means[0], text - lam * means[1]",
             "image, text = image + lam * means[0], text + lam * means[1]",
             (EVALUATE + "test_dn_retrieval_is_the_formula_on_normalised_features",)),
    Mutation("dn-retrieval-means-swapped-renormalised", "train/evaluate.py",
             "image, text = image - lam * means[0], text - lam * means[1]",
             "image, text = tokens(image - lam * means[1]), tokens(text - lam * means[0])",
             (EVALUATE + "test_dn_retrieval_is_the_formula_on_normalised_features",)),
    Mutation("eval-task-templates-ignored", "pipelines/evaluate.py",
             "task.templates or cfg.templates or TEMPLATES", "cfg.templates or TEMPLATES",
             (EVALUATE + "test_cli_on_the_world_split_for_stock_and_oblique_checkpoints",)),
    Mutation("dn-eval-means-swapped", "train/evaluate.py",
             "return image[pick].mean(0), text[",
             "return text[pick].mean(0), image[",
             (EVALUATE + "test_dn_means_are_means_of_seeded_samples_of_each_modality",)),
    Mutation("recall-ties-for-the-true-partner", "train/evaluate.py",
             "i2t_rank = (sim >= true[:, None]).sum(1) - 1",
             "i2t_rank = (sim > true[:, None]).sum(1)",
             (EVALUATE + "test_zero_shot_and_retrieval_on_known_features",)),
    Mutation("eval-tokens-normalised-whole", "train/evaluate.py",
             "return F.normalize(features.float(), dim=-1)",
             "return F.normalize(features.float().flatten(1), dim=-1).view_as(features)",
             (EVALUATE + "test_oblique_features_score_as_the_sum_over_tokens",)),
    # ---- DN in the score stage (curate/dn.py)
    Mutation("dn-center-mean-added", "curate/dn.py",
             "return normalise(emb) - lam * mean", "return normalise(emb) + lam * mean",
             (SCORES + "test_dn_centres_normalised_embeddings", SCORES + "test_score_shard_columns_against_a_hand_computation")),
    Mutation("dn-center-lambda-dropped", "curate/dn.py",
             "return normalise(emb) - lam * mean", "return normalise(emb) - mean",
             (SCORES + "test_dn_centres_normalised_embeddings", SCORES + "test_score_shard_columns_against_a_hand_computation")),
    Mutation("dn-center-renormalised", "curate/dn.py",
             "return normalise(emb) - lam * mean", "return normalise(normalise(emb) - lam * mean)",
             (SCORES + "test_dn_centres_normalised_embeddings", SCORES + "test_score_shard_columns_against_a_hand_computation")),
    Mutation("dn-score-means-swapped", "curate/dn.py",
             "return normalise(image_emb).mean(0), normalise(text_emb).mean(0)",
             "return normalise(text_emb).mean(0), normalise(image_emb).mean(0)",
             (SCORES + "test_dn_centres_normalised_embeddings",)),
    # ---- the posterior, the loss, the mixture (curate/scores.py, curate/teacher.py)
    Mutation("posterior-scale-dropped", "curate/scores.py",
             "positive = scale * (v * t).sum(-1)\n    negatives = [scale * v @ bank_t.T, scale * t @ bank_v.T]",
             "positive = (v * t).sum(-1)\n    negatives = [v @ bank_t.T, t @ bank_v.T]",
             (SCORES + "test_posterior_is_the_softmax_over_positive_and_bank",)),
    Mutation("posterior-self-in-bank-kept", "curate/scores.py",
             "neg = np.where(self_in_bank, -np.inf, neg)", "neg = neg",
             (SCORES + "test_the_pair_itself_in_the_bank_is_not_its_own_negative",
              SCORES + "test_score_shard_columns_against_a_hand_computation")),
    Mutation("posterior-positive-left-out", "curate/scores.py",
             "logsumexp(np.concatenate([positive[:, None], neg], axis=1))", "logsumexp(neg)",
             (SCORES + "test_posterior_is_the_softmax_over_positive_and_bank",)),
    Mutation("pair-loss-not-halved", "curate/scores.py",
             "return -0.5 * (log_p_i2t + log_p_t2i)", "return -(log_p_i2t + log_p_t2i)",
             (SCORES + "test_pair_loss_against_the_rest_of_the_batch_is_the_clip_loss",)),
    Mutation("teacher-scale-is-log-scale", "curate/teacher.py",
             "return float(model.logit_scale.exp().item())", "return float(model.logit_scale.item())",
             (SCORES + "test_the_teachers_learned_scale_is_exp_of_its_logit_scale",)),
    Mutation("mixture-clean-is-high-loss", "curate/scores.py",
             "posterior = np.exp(log_pdf[:, 0] - logsumexp(log_pdf))",
             "posterior = np.exp(log_pdf[:, 1] - logsumexp(log_pdf))",
             (SCORES + "test_mixture_finds_the_two_components_and_clean_prob_is_monotone",
              SCORES + "test_score_shard_columns_against_a_hand_computation")),
    Mutation("mixture-components-in-reverse", "curate/scores.py",
             "order = np.argsort(gmm.means_.ravel())", "order = np.argsort(-gmm.means_.ravel())",
             (SCORES + "test_mixture_finds_the_two_components_and_clean_prob_is_monotone",)),
    # ---- the score task (pipelines/score_tasks.py: the formula lines only)
    Mutation("score-no-dn-centring", "pipelines/score_tasks.py",
             'v = dn_center(column(good, f"image_emb_{j}"), ck["mu_v"], lam)',
             'v = normalise(column(good, f"image_emb_{j}"))',
             (SCORES + "test_score_shard_columns_against_a_hand_computation",)),
    Mutation("score-scale-dropped", "pipelines/score_tasks.py",
             'ck["bank_t"], ck["scale"], self_in_bank)', 'ck["bank_t"], 1.0, self_in_bank)',
             (SCORES + "test_score_shard_columns_against_a_hand_computation",)),
    Mutation("score-loss-of-first-checkpoint", "pipelines/score_tasks.py",
             'loss = pair_losses(state["teacher"], state["averaged"], losses, good_keys)', "loss = losses[0]",
             (SCORES + "test_score_shard_columns_against_a_hand_computation",)),
    Mutation("held-out-loss-is-the-whole-teachers", "curate/scores.py",
             "return np.stack(losses[1:], axis=1)[np.arange(len(keys)), folds]", "return losses[0]",
             ("tests/test_scores.py::test_folds_come_from_the_key_alone_and_the_held_out_loss_from_the_other_folds_teacher",
              "tests/test_score.py::test_held_out_teachers_score_each_pair_with_the_one_that_never_saw_it")),
    Mutation("score-clean-prob-is-cosine", "pipelines/score_tasks.py",
             '"clean_prob": clean_probability(state["mixture"], loss),', '"clean_prob": cosine_score(v0, t0),',
             (SCORES + "test_score_shard_columns_against_a_hand_computation",)),
    # ---- which teacher epochs the loss is averaged over, detection by noise kind
    Mutation("early-learning-end-least-noisy", "curate/scores.py",
             "key=lambda e: (-noise[epochs.index(e)], e)", "key=lambda e: (noise[epochs.index(e)], e)",
             (SCORES + "test_early_learning_ends_where_the_mixture_finds_the_most_noise",
              SCORES + "test_the_loss_is_averaged_over_the_chosen_checkpoints_only")),
    Mutation("own-teacher-every-epoch", "pipelines/score.py",
             '(max(kept) if rule == "all" else best_epoch)', "max(kept)",
             (SCORES + "test_the_own_teachers_loss_epochs_follow_the_rule",)),
    Mutation("detection-kind-against-every-pair", "curate/scores.py",
             '"auroc": aurocs((kinds == kind) | ~noisy)}', '"auroc": aurocs(np.ones(len(noisy), dtype=bool))}',
             (SCORES + "test_detection_by_noise_kind_on_a_constructed_table",)),
    # ---- CLIP and SoftCLIP (train/losses)
    Mutation("clip-t2i-uses-image-rows", "train/losses/clip.py",
             "t2i = weighted_cross_entropy(per_text, labels, weight)", "t2i = weighted_cross_entropy(per_image, labels, weight)",
             (LOSSES + "test_clip_loss_is_the_formula_and_names_its_terms",)),
    Mutation("softclip-alpha-complement", "train/losses/softclip.py",
             "torch.full((v.shape[0],), self.alpha,", "torch.full((v.shape[0],), 1 - self.alpha,",
             (LOSSES + "test_softclip_matches_the_formula",)),
    Mutation("softclip-target-mass-ignores-q-ii", "train/losses/softclip.py",
             "a = alpha * torch.exp(log_norm_q_neg - log_norm_q)", "a = alpha",
             (LOSSES + "test_softclip_matches_the_formula",)),
    Mutation("softclip-tau-s-dropped-on-text", "train/losses/softclip.py",
             "(b / tau_s) @ all_b.T", "b @ all_b.T",
             (LOSSES + "test_softclip_matches_the_formula",)),
    Mutation("softclip-self-tau-s-is-s", "train/losses/softclip.py",
             "1.0 / torch.as_tensor(logit_scale).detach()", "torch.as_tensor(logit_scale).detach()",
             (LOSSES + "test_softclip_self_target_is_detached",)),
    Mutation("softclip-negatives-keep-the-positive", "train/losses/softclip.py",
             'x[torch.arange(x.shape[0], device=x.device), positives] = float("-inf")',
             "x[torch.arange(x.shape[0], device=x.device), positives] += 0.0",
             (LOSSES + "test_softclip_matches_the_formula",)),
    Mutation("softclip-negative-kl-sign", "train/losses/softclip.py",
             "kl_neg = cross - log_norm_q_neg + log_norm_p_neg", "kl_neg = cross + log_norm_q_neg - log_norm_p_neg",
             (LOSSES + "test_softclip_matches_the_formula",)),
    Mutation("softclip-gradient-at-positive", "train/losses/softclip.py",
             "grad_soft * (a - b) / n", "grad_soft * (b - a) / n",
             (LOSSES + "test_softclip_self_target_is_detached", LOSSES + "test_gradcheck")),
    # ---- oblique (train/losses/oblique.py, train/oblique.py)
    Mutation("oblique-loss-normalises-whole-vector", "train/losses/oblique.py",
             "u, w = F.normalize(u, dim=-1), F.normalize(w, dim=-1)",
             "u, w = F.normalize(u.flatten(1), dim=-1).view_as(u), F.normalize(w.flatten(1), dim=-1).view_as(w)",
             (LOSSES + "test_oblique_normalises_each_token_on_its_own",)),
    Mutation("oblique-scale-uncapped", "train/losses/oblique.py",
             ".clamp(max=self.logit_scale_max)", "",
             (LOSSES + "test_oblique_caps_the_logit_scale",)),
    Mutation("oblique-sphere-loss-normalises-per-token", "train/losses/oblique.py",
             "u, w = u.flatten(1).unsqueeze(1), w.flatten(1).unsqueeze(1)", "u, w = u, w",
             (LOSSES + "test_oblique_sphere_is_clip_on_the_jointly_normalised_tokens",)),
    Mutation("oblique-towers-normalise-whole-vector", "train/oblique.py",
             "return F.normalize(tokens, dim=-1) if normalize else tokens",
             "return F.normalize(tokens.flatten(1), dim=-1).view_as(tokens) if normalize else tokens",
             ("tests/test_oblique.py::test_k4_shapes_norms_and_similarity",)),
    Mutation("oblique-similarity-across-tokens", "train/oblique.py",
             'return torch.einsum("nkd,mkd->nm", u, v)', 'return torch.einsum("nkd,mjd->nm", u, v)',
             ("tests/test_oblique.py::test_k4_shapes_norms_and_similarity",)),
    Mutation("oblique-rn-queries-carry-the-mean", "train/oblique.py",
             "extra = self.q_proj(self.extra_query_embedding.to(x.dtype))[:, None, :].expand(-1, n, -1)",
             "extra = self.q_proj(x[:1] - self.positional_embedding[:1, None, :].to(x.dtype)"
             " + self.extra_query_embedding[:, None, :].to(x.dtype))",
             ("tests/test_oblique.py::test_resnet_k16_queries_share_the_stock_keys_and_train",)),
    Mutation("oblique-rn-queries-are-keys", "train/oblique.py",
             "heads(self.k_proj(x)), heads(self.v_proj(x))",
             "*(heads(proj(torch.cat([x, self.extra_query_embedding[:, None, :].expand(-1, n, -1)])))"
             " for proj in (self.k_proj, self.v_proj))",
             ("tests/test_oblique.py::test_resnet_k16_queries_share_the_stock_keys_and_train",)),
    # ---- MMCL's teacher across a resume, SoftCLIP's self-target temperature (train/loop.py, pipelines/train.py)
    Mutation("mmcl-teacher-not-in-checkpoint", "train/loop.py",
             'state["teacher"] = teacher.state_dict()', 'state["teacher_weights"] = teacher.state_dict()',
             ("tests/test_train.py::test_mmcl_teacher_is_the_stage1_model_and_survives_resume",)),
    Mutation("softclip-self-target-gets-the-teachers-tau", "pipelines/train.py",
             'teacher_targets = cfg.loss_args.get("target", "teacher") == "teacher"', "teacher_targets = True",
             ("tests/test_train.py::test_softclip_gets_the_score_stage_teachers_tau_s_for_teacher_targets_only",)),
    # ---- MMCL phi / psi (train/losses/mmcl.py)
    Mutation("mmcl-eps-shifted", "train/losses/mmcl.py",
             "log_eps = math.log(self.eps) if self.eps > 0", "log_eps = math.log(1 + self.eps) if self.eps > 0",
             (LOSSES + "test_mmcl_clip_choice_with_another_eps_is_the_formula",)),
    Mutation("mmcl-linear-default-eps", "train/losses/mmcl.py",
             'CHOICES = {"clip": 1.0, "linear": 0.0}', 'CHOICES = {"clip": 1.0, "linear": 1.0}',
             (LOSSES + "test_mmcl_linear_matches_a_hand_computation",)),
    Mutation("mmcl-linear-positive-off-by-one", "train/losses/mmcl.py",
             "i2t = (self.eps + v @ all_t.sum(0) - n_all * s_pos)", "i2t = (self.eps + v @ all_t.sum(0) - (n_all - 1) * s_pos)",
             (LOSSES + "test_mmcl_linear_matches_a_hand_computation",)),
    Mutation("mmcl-psi-scale-inverted", "train/losses/mmcl.py",
             "per_image, per_text = self.logits(v, t, all_v, all_t, 1.0 / tau)",
             "per_image, per_text = self.logits(v, t, all_v, all_t, tau)",
             (LOSSES + "test_mmcl_clip_choice_is_clip_loss_at_scale_one_over_tau",)),
    # ---- scores into the batch (train/data.py, train/loop.py): slow tests, they shard a small world and train a step
    Mutation("join-key-off-by-one", "train/data.py",
             'row = self.rows.get(sample["__key__"])',
             "row = self.rows.get(f\"{int(sample['__key__']) + 1:0{len(sample['__key__'])}d}\")",
             (BY_KEY + "[clip]",)),
    Mutation("join-wrong-text-column", "train/losses/softclip.py",
             'else "teacher_text_emb")', 'else "teacher_image_emb")',
             (BY_KEY + "[clip]",)),
    Mutation("sentence-targets-not-remapped", "train/losses/softclip.py",
             'teacher_text="sentence_emb" if text_targets', 'teacher_text="teacher_text_emb" if text_targets',
             (BY_KEY + "[sentence]",)),
    Mutation("loop-drops-declared-fields", "train/loop.py",
             'extras = {arg: batch[column].to(device) for arg, column in loss_fn.score_fields.items()}',
             'extras = {arg: batch[column].to(device) for arg, column in loss_fn.score_fields.items() if arg != "teacher_text"}',
             (BY_KEY + "[clip]",)),
]


def copy_repository(dest: Path) -> None:
    """The tracked files as they are in the working tree (nothing of .venv or data)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, files.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def apply(mutation: Mutation, root: Path) -> None:
    path = root / mutation.file
    text = path.read_text()
    count = text.count(mutation.snippet)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name}: its snippet occurs {count} times in {mutation.file} "
                         f"(expected once): {mutation.snippet!r}")
    path.write_text(text.replace(mutation.snippet, mutation.replacement))


def run_tests(root: Path, tests: list[str]) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    started = time.time()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider"],
                                cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:  # pytest-timeout (600 s a test) normally fails the test first
        return 1, f"FAILED timeout (no answer within {TIMEOUT} s)", time.time() - started
    return result.returncode, result.stdout + result.stderr, time.time() - started


def first_failure(output: str) -> str:
    """The node id of the first FAILED or ERROR line of pytest's short summary."""
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return found.group(1) if found else "?"


def with_copy(fn):
    folder = Path(tempfile.mkdtemp(prefix="softcurate-mutant-"))
    try:
        copy_repository(folder)
        return fn(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check(mutation: Mutation) -> dict:
    def run(folder: Path) -> dict:
        apply(mutation, folder)
        code, output, seconds = run_tests(folder, list(mutation.tests))
        # 1: a test failed; 2: interrupted or an error (e.g. in a fixture); 4, 5: the selection itself is wrong
        status = "killed" if code in (1, 2) else "survived" if code == 0 else f"selection error (pytest {code})"
        return {"name": mutation.name, "status": status, "by": first_failure(output) if code in (1, 2) else "",
                "seconds": seconds, "output": output}
    return with_copy(run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    args = parser.parse_args()
    names = [m.name for m in MUTATIONS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(unknown)} (see --list)")
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:<44} {m.file:<26} {' '.join(t.split('::', 1)[1] for t in m.tests)}")
        return 0
    for m in chosen:  # every snippet is where it should be before anything runs
        if (ROOT / m.file).read_text().count(m.snippet) != 1:
            raise SystemExit(f"mutation {m.name}: its snippet is not exactly once in {m.file}; "
                             "run tests/test_mutations.py")
    tests = sorted({t for m in chosen for t in m.tests})
    print(f"baseline: {len(tests)} test selections on the unmutated copy ...", flush=True)
    code, output, seconds = with_copy(lambda folder: run_tests(folder, tests))
    if code != 0:
        print(output[-4000:])
        print(f"the unmutated tests fail (pytest exit {code}); fix them before checking mutations", file=sys.stderr)
        return 2
    print(f"baseline passed in {seconds:.0f} s", flush=True)
    results = []
    for m in chosen:
        result = check(m)
        results.append(result)
        print(f"  {m.name:<44} {result['status']:<9} {result['seconds']:5.1f} s  {result['by']}", flush=True)
    killed = sum(r["status"] == "killed" for r in results)
    print("\n| mutation | file | result | killed by |\n|---|---|---|---|")
    for m, r in zip(chosen, results):
        print(f"| {m.name} | {m.file} | {r['status']} | {r['by'].split('::', 1)[-1]} |")
    print(f"\nkill rate: {killed}/{len(results)} ({100 * killed / len(results):.0f}%), "
          f"{sum(r['seconds'] for r in results):.0f} s of tests")
    for r in results:
        if r["status"] != "killed":
            print(f"\n--- {r['name']}: {r['status']}\n{r['output'][-2000:]}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
