using System.Diagnostics;
using Xunit.Abstractions;

namespace LoRAHub.Reliability.Tests;

/// <summary>
/// Ctrl+C through the real host (`loraHub run`), as SIGINT from outside: during training it stops after the step with a
/// checkpoint and the script ends there (exit 130, the message says how to resume); before training it ends the process
/// at once, as Ctrl+C does any program.
/// </summary>
[Collection(Serial.Name)]
public sealed class CtrlCTests(ITestOutputHelper output)
{
    private static void Interrupt(Process process)
    {
        using var kill = Process.Start("kill", ["-INT", process.Id.ToString()]);
        kill.WaitForExit();
    }

    private static string Script(TempFolder temp, string before)
    {
        var script = temp["user", "train.csx"];
        Directory.CreateDirectory(Path.GetDirectoryName(script)!);
        File.WriteAllText(script, TrainingScripts.Tiny(before: before));
        return script;
    }

    private ChildProcess.Result Run(TempFolder temp, string script, string interruptAt)
    {
        var sent = 0;
        var run = ChildProcess.Run(ChildProcess.Dotnet, [HostCli.HostDll, "run", "--device", "cpu", script], onLine: (line, process) =>
        {
            if (sent == 0 && line.StartsWith(interruptAt, StringComparison.Ordinal))
            {
                sent++;
                Interrupt(process);
            }
            return false;
        }, timeoutSeconds: 180, directory: temp["user"]);
        output.WriteLine($"exit {run.ExitCode}\n{run.Text}");
        Assert.False(run.TimedOut, "the host did not stop");
        Assert.Equal(1, sent);
        return run;
    }

    [Fact]
    public void Sigint_during_training_stops_after_the_step_with_a_checkpoint_and_ends_the_script()
    {
        if (OperatingSystem.IsWindows()) return; // no SIGINT from outside there
        using var temp = new TempFolder("ctrl-c");
        var run = Run(temp, Script(temp, ""), "step 3/");

        Assert.Contains("stopping after this step (Ctrl+C again to quit now)", run.Stderr);
        var stopped = run.Stderr.Split('\n').Select(l => l.TrimEnd()).Single(l => l.StartsWith("stopped at step ", StringComparison.Ordinal));
        var step = long.Parse(stopped["stopped at step ".Length..stopped.IndexOf(';')]);
        Assert.InRange(step, 3, 99_999);
        Assert.EndsWith($"to continue, run again with Resume = true (checkpoint {Path.Combine(temp["user"], "run", $"checkpoint-{step:D6}")})", stopped);
        Assert.True(Directory.Exists(Path.Combine(temp["user"], "run", $"checkpoint-{step:D6}")));
        Assert.DoesNotContain(run.Stdout, l => l.StartsWith("trained ", StringComparison.Ordinal));
        Assert.Equal(130, run.ExitCode);
    }

    [Fact]
    public void Sigint_before_training_ends_the_process_at_once()
    {
        if (OperatingSystem.IsWindows()) return;
        using var temp = new TempFolder("ctrl-c-early");
        var run = Run(temp, Script(temp, "Output(\"ready\"); System.Threading.Thread.Sleep(TimeSpan.FromSeconds(60));"), "ready");

        Assert.DoesNotContain("stopping after this step", run.Stderr);
        Assert.False(Directory.Exists(Path.Combine(temp["user"], "run")));
        Assert.Equal(130, run.ExitCode);
    }
}
