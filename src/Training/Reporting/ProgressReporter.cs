using Spectre.Console;

namespace LoRAHub.Training.Reporting;

/// <summary>
/// What the user watches: a live Spectre.Console progress bar (step, loss, lr, tokens/s, ETA, GPU memory) on an
/// interactive terminal, plain log lines otherwise (CI, redirected output, tests).
/// </summary>
public sealed class ProgressReporter
{
    private readonly bool live;
    private readonly Action<string> writeLine;
    private ProgressTask? task;

    public ProgressReporter(bool showProgress, Action<string>? writeLine = null)
    {
        live = showProgress && AnsiConsole.Profile.Capabilities.Interactive && !Console.IsOutputRedirected;
        this.writeLine = writeLine ?? (s => AnsiConsole.MarkupLine(Markup.Escape(s)));
    }

    /// <summary>Runs the training loop with the progress display around it.</summary>
    public void Run(long startStep, long maxSteps, Action<ProgressReporter> body)
    {
        if (!live)
        {
            body(this);
            return;
        }
        AnsiConsole.Progress()
            .AutoClear(false)
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn(), new SpinnerColumn())
            .Start(ctx =>
            {
                task = ctx.AddTask("training", maxValue: maxSteps);
                task.Value = startStep;
                body(this);
                task.StopTask();
            });
    }

    public void Step(StepMetrics m, long maxSteps)
    {
        var memory = m.GpuMemoryBytes is long b ? $" gpu {b / (double)(1L << 30):0.0} GiB" : "";
        var text = $"step {m.Step}/{maxSteps} loss {m.Loss:0.0000} lr {m.LearningRate:0.00e0} {m.TokensPerSecond:N0} tok/s{memory}" +
                   (m.Skipped ? " (skipped: non-finite)" : "");
        if (task != null)
        {
            task.Description = Markup.Escape(text);
            task.Value = m.Step;
        }
        else
        {
            writeLine(text);
        }
    }

    public void Message(string text) => writeLine(text);
}
