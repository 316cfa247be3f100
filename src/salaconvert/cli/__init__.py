"""The `salaconvert` command. Each verb is a thin wrapper over a library function; heavy imports
happen inside the verbs so that `--help` answers at once."""
import typer

from salaconvert.cli import analyze, bench, convert, distill, eval, generate, info

app = typer.Typer(
    name="salaconvert",
    help="Turn a pretrained Hugging Face decoder LM into a long-context sparse+linear hybrid (MiniCPM-SALA style).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("analyze")(analyze.analyze)
app.command("convert")(convert.convert)
app.command("generate")(generate.generate)
app.command("info")(info.info)
app.command("distill")(distill.distill)
app.command("eval")(eval.eval_cmd)
app.command("bench")(bench.bench)


def main() -> None:
    app()
