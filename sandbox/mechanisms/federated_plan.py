"""Which sites a federated job runs on, and each site's plan: decided before any row is read.

``plan_sites`` is what admission, the quote and the charge share (``sandbox.mechanisms.
precheck`` runs it for all three; ``federated.job_config`` runs it again from the persisted
spec): the sites that take part, why the others are left out, the validated
``FederatedConfig`` and, when the dataset's counts are public, each taking part site's plan
made by ``training.federated.site_plan.plan_for``, the function the sites run and the
service charges from, on the training size the service knows (the site's persons x
``TRAIN_FRACTION``). The config carries those sizes (``FederatedConfig.plan_sizes``) and
every site plans on them, not on its exact split: a quote's per-site figures are the run's
and the charge's to the last digit, and a site's size is never a figure the run takes from
the site.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from foundation.errors import SpecError
from sandbox.jobspec import FederatedSpec, JobSpec
from sandbox.mechanisms.dpsgd_plan import TRAIN_FRACTION
from sandbox.spec_fields import resolved
from training.federated.config import ClientDPConfig, FederatedConfig, Strategy
from training.federated.site_plan import SitePlan as SiteDPPlan
from training.federated.site_plan import plan_for


def _federated(spec: JobSpec) -> FederatedSpec:
    """The spec's ``[federated]`` table; a DP-SGD spec is refused, naming the key to set."""
    if spec.federated is None:
        raise SpecError(
            "mode", "is not federated", 'set mode = "federated" with a [federated] table'
        )
    return spec.federated


def resolve_sites(spec: JobSpec, dataset_sites: dict[str, int]) -> tuple[str, ...]:
    f = _federated(spec)
    known = sorted(dataset_sites)
    if not f.sites:
        return tuple(known)
    unknown = [s for s in f.sites if s not in dataset_sites]
    if unknown:
        raise SpecError(
            "federated.sites",
            f"{unknown[0]!r} is not a site of dataset {spec.dataset!r}",
            f"sites: {', '.join(known)}",
        )
    return f.sites


@dataclass(frozen=True)
class SitePlan:
    """Which sites take part, decided before any row is read, and the validated config."""

    sites: tuple[str, ...]
    #: site -> why it is left out (only from public, declared sizes)
    left_out: dict[str, str]
    config: FederatedConfig
    #: site -> its DP-SGD plan at the size the service knows; only with public counts (with
    #: private counts a plan that cannot be made for a site's exact size is no free oracle:
    #: the site finds it after reading, charged)
    plans: dict[str, SiteDPPlan] = field(default_factory=dict)


def site_n_train(dataset: Any, site: str) -> int:
    """A site's training persons as the service knows them (the dataset card's count)."""
    return max(1, int(dataset.sites[site] * TRAIN_FRACTION))


def plan_sites(spec: JobSpec, dataset: Any) -> SitePlan:
    """Refuse what per-site budgets cannot charge honestly, pick the sites, validate the config.

    - A person with rows at two sites would be charged once per site while each budget
      shows one charge: such a dataset is refused (train with ``mode = "dp-sgd"`` on the
      whole dataset instead: one budget).
    - Participation is decided here, from the dataset card, before any row is read: a site
      too small for ``min_site_rows`` or the batch, or one no plan can be made for at its
      size (delta >= 1/n), is left out only when the contract declares the counts public
      (deciding on private counts would be a free threshold oracle on an exact count). With
      private counts every asked site takes part and is charged.
    - Fewer sites taking part than ``federated.min_sites`` is refused here: the run would
      stop at its setup ("only N sites are ready") after the sites read their rows.
    - The config is built (and so checked) before the ledger reserves anything.
    """
    f = _federated(spec)
    if dataset.cross_site_persons > 0:
        raise SpecError(
            "mode",
            f"dataset {spec.dataset!r} has persons with rows at more than one site, so "
            "per-site budgets would charge such a person once per site",
            'train with mode = "dp-sgd" on the whole dataset (one budget), or ask the data '
            "steward to re-ingest it with each person at one site",
        )
    asked = resolve_sites(spec, dict(dataset.sites))
    left_out: dict[str, str] = {}
    plans: dict[str, SiteDPPlan] = {}
    if dataset.counts_public:
        need = max(f.min_site_rows, resolved(spec.training.batch_size, "training.batch_size"))
        for site in asked:
            if int(dataset.sites[site] * TRAIN_FRACTION) < need:
                left_out[site] = (
                    f"fewer training persons than federated.min_site_rows / "
                    f"training.batch_size ({need})"
                )
        # the plan each site would make at setup (it leaves itself out when it cannot):
        # made here, with the config's own figures, so the quote shows what the sites run
        whole = _config(spec, asked, _sizes(dataset, asked), min_sites=1)
        for site in asked:
            if site in left_out:
                continue
            try:
                plans[site] = plan_for(whole, site, site_n_train(dataset, site))
            except SpecError as exc:
                left_out[site] = f"no DP plan fits its size: {exc.problem}"
    sites = tuple(s for s in asked if s not in left_out)
    if not sites:
        raise SpecError(
            "federated.sites",
            "no site is large enough for min_site_rows and batch_size",
            "lower federated.min_site_rows or training.batch_size",
        )
    if f.clients_per_round is not None and len(sites) < f.clients_per_round:
        raise SpecError(
            "federated.clients_per_round",
            f"asks for {f.clients_per_round} sites a round but only {len(sites)} would take "
            f"part ({', '.join(sites)})",
            f"set clients_per_round <= {len(sites)}, or lower federated.min_site_rows or "
            "training.batch_size so that more sites take part",
        )
    if len(sites) < f.min_sites:
        raise SpecError(
            "federated.min_sites",
            f"only {len(sites)} site(s) would take part ({', '.join(sites)}; left out: "
            f"{', '.join(sorted(left_out)) or 'none'}), fewer than min_sites ({f.min_sites})",
            "lower federated.min_sites, or lower federated.min_site_rows or "
            "training.batch_size so that more sites take part",
        )
    return SitePlan(sites, left_out, _config(spec, sites, _sizes(dataset, sites)), plans)


def _sizes(dataset: Any, sites: tuple[str, ...]) -> dict[str, int]:
    return {site: site_n_train(dataset, site) for site in sites}


def _config(
    spec: JobSpec,
    sites: tuple[str, ...],
    sizes: dict[str, int] | None,
    *,
    min_sites: int | None = None,
) -> FederatedConfig:
    """The run's config for ``sites`` planned on ``sizes`` (``min_sites``: the spec's
    unless given)."""
    f = _federated(spec)
    return FederatedConfig(
        rounds=f.rounds,
        sites=sites,
        label=spec.label,
        features=spec.features,
        model=spec.model,
        epsilon=spec.privacy.epsilon,
        delta=spec.privacy.delta,
        # a federated spec is never "auto" (the parser refuses it)
        max_grad_norm=resolved(spec.privacy.max_grad_norm, "privacy.max_grad_norm"),
        batch_size=resolved(spec.training.batch_size, "training.batch_size"),
        lr=resolved(spec.training.lr, "training.lr"),
        optimizer=spec.training.optimizer,
        weight_decay=spec.training.weight_decay,
        clients_per_round=f.clients_per_round,
        min_sites=f.min_sites if min_sites is None else min_sites,
        local_epochs=f.local_epochs,
        strategy=Strategy(f.strategy.value),
        mu=f.mu,
        secure_aggregation=f.secure_aggregation,
        client_dp=(
            ClientDPConfig(
                noise_multiplier=f.server_noise_multiplier,
                clipping_norm=float(f.server_clipping_norm or 0.0),
            )
            if f.server_noise_multiplier is not None
            else None
        ),
        seed=spec.training.seed,
        evaluate=spec.privacy.evaluate,
        # participation was decided by the service before any row was read (plan_sites);
        # a site still too small for its batch is left out by the site and keeps its charge
        min_site_rows=1,
        num_cpus=spec.resources.cpus,
        num_gpus=spec.resources.gpus,
        plan_sizes=sizes,
    )
