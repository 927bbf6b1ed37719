"""`mole evaluate run|compare|gates`: benchmarks, comparisons, gate statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mole.cli.common import COMPILE_HELP, fail, parse_named

evaluate_app = typer.Typer(
    help="Evaluate a model on prompt benchmarks (mean ± standard error over repeats), compare runs, plot gates.",
    no_args_is_help=True,
)


@evaluate_app.command("run")
def evaluate_run(
    model: Annotated[str, typer.Option(help="A diffusers folder, or a registered model (models:/mole@candidate).")],
    prompts: Annotated[Path, typer.Option(help="Prompt file from `mole prompts`.")],
    output: Annotated[Path, typer.Option(help="Folder for images, scores.csv, report.json, report.md.")],
    experts: Annotated[list[str] | None, typer.Option(help="Expert LoRA as NAME=PATH.")] = None,
    gates: Annotated[str | None, typer.Option(help="Gates file or the gates stage's folder (full MoLE).")] = None,
    num_prompts: Annotated[int, typer.Option(help="Prompts sampled per repeat.")] = 3000,
    repeats: Annotated[int, typer.Option(help="Repeats (mean ± standard error over them).")] = 3,
    scorers: Annotated[str, typer.Option(help="Comma-separated: clip, hps_v1, hps_v2, imagereward.")] = "clip",
    scorer_config: Annotated[
        Path | None, typer.Option(help="YAML: scorer name -> options (checkpoint paths).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the prompt sample and the per-prompt seeds.")] = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Guidance scale.")] = 7.5,
    batch_size: Annotated[int, typer.Option(help="Images generated and scored together.")] = 4,
    label: Annotated[str | None, typer.Option(help="Row label in comparison tables.")] = None,
    compile_unet: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
) -> None:
    """Generate for sampled benchmark prompts and score them (the paper's tables 1-3)."""
    import yaml

    from mole.evaluate.runner import EvalSettings, evaluate_tracked

    try:
        conf = yaml.safe_load(scorer_config.read_text(encoding="utf-8")) if scorer_config else {}
        settings = EvalSettings(
            model=model, prompts=str(prompts), experts=parse_named(experts, "--experts"), gates=gates,
            num_prompts=num_prompts, repeats=repeats, scorers=[x.strip() for x in scorers.split(",") if x.strip()],
            scorer_config=conf or {}, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size, label=label,
            compile_unet=compile_unet,
        )  # fmt: skip
        report = evaluate_tracked(settings, output)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise fail(err) from err
    typer.echo((output / "report.md").read_text(encoding="utf-8"))
    del report


@evaluate_app.command("compare")
def evaluate_compare(
    runs: Annotated[list[Path], typer.Argument(help="Evaluation output folders (or report.json files).")],
    labels: Annotated[str | None, typer.Option(help="Comma-separated row labels, one per run.")] = None,
    output: Annotated[Path | None, typer.Option(help="Write the table as OUTPUT.md and OUTPUT.csv.")] = None,
    gate_plots: Annotated[
        Path | None,
        typer.Option(
            help="Also plot the gates of every MoLE run side by side (e.g. plain vs timestep gates) into this "
            "folder, with each expert's specialisation (own prompts vs the others'); loads the runs' models."
        ),
    ] = None,
    groups: Annotated[
        Path | None, typer.Option(help="With --gate-plots: JSON/YAML prompt groups (default: one per expert).")
    ] = None,
    gate_steps: Annotated[
        int | None, typer.Option(help="With --gate-plots: denoising steps (default: each run's own).")
    ] = None,
) -> None:
    """Lay runs side by side: base vs stage 1 vs + experts vs MoLE (table 2), local vs global vs both (table 3),
    MoLE vs MoLE with timestep gates. Runs should share prompts, seeds and sampler settings (a warning says
    which differ); --gate-plots adds their gate plots."""
    import yaml

    from mole.evaluate.runner import compare_csv, compare_gates, compare_table, load_report, sample_mismatches

    try:
        reports = [load_report(r) for r in runs]
    except FileNotFoundError as err:
        raise fail(err) from err
    names = [x.strip() for x in labels.split(",")] if labels else None
    if names is not None and len(names) != len(reports):
        raise typer.BadParameter(f"{len(names)} labels for {len(reports)} runs")
    table = compare_table(reports, names)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
        compare_csv(reports, output.with_suffix(".csv"), names)
    typer.echo(table)
    differing = sample_mismatches(reports)
    if differing:
        typer.secho(f"warning: the runs differ in {', '.join(differing)}: not the same prompts and seeds",
                    fg=typer.colors.YELLOW, err=True)  # fmt: skip
    if gate_plots is not None:
        from mole.evaluate.gates import specialisation_table

        try:
            prompt_groups = yaml.safe_load(groups.read_text(encoding="utf-8")) if groups else None
            rows = compare_gates(reports, names, gate_plots, groups=prompt_groups, steps=gate_steps)
        except (ValueError, FileNotFoundError) as err:
            raise fail(err) from err
        typer.echo("\nGate specialisation (mean global gate on the expert's own prompts / on the others'):")
        typer.echo(specialisation_table(rows))
        typer.echo(f"gate plots in {gate_plots}")


@evaluate_app.command("gates")
def evaluate_gates(
    model: Annotated[Path, typer.Option(help="The base (stage-1) diffusers folder, or stage 1's --output folder.")],
    experts: Annotated[list[str], typer.Option(help="Expert LoRA as NAME=PATH.")],
    gates: Annotated[Path, typer.Option(help="Gates file or the gates stage's --output folder.")],
    output: Annotated[Path, typer.Option(help="Folder for global_gates.png, local_maps.png, gate_stats.json.")],
    groups: Annotated[
        Path | None,
        typer.Option(
            help="JSON/YAML: group name -> list of prompts (default: face, hand, feet for a feet expert, both); "
            "a group named like an expert is its own prompts for the specialisation numbers."
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 25,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Gate values over denoising steps per prompt group, and local score maps (the paper's figure 7)."""
    import yaml

    from mole.evaluate.gates import gate_statistics, plot_gate_statistics, specialisation
    from mole.generate import load_pipeline

    try:
        prompt_groups = yaml.safe_load(groups.read_text(encoding="utf-8")) if groups else None
        pipe = load_pipeline(model, parse_named(experts, "--experts"), gates)
        stats = gate_statistics(pipe, prompt_groups, steps=steps, seed=seed)
        written = plot_gate_statistics(stats, output)
    except (ValueError, FileNotFoundError) as err:
        raise fail(err) from err
    for group in stats.global_by_group:
        means = ", ".join(f"{e} {v:.3f}" for e, v in zip(stats.experts, stats.mean_global(group), strict=True))
        typer.echo(f"{group} prompts: mean global gate {means}")
    for expert, spec in specialisation(stats).items():
        typer.echo(f"{expert} expert: own prompts {spec['own']:.3f}, others' {spec['others']:.3f} "
                   f"({spec['delta']:+.3f})")  # fmt: skip
    typer.echo("wrote " + ", ".join(str(p) for p in written))
