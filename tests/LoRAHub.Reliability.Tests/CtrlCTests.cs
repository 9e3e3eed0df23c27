using System.Diagnostics;
using Xunit.Abstractions;

namespace LoRAHub.Reliability.Tests;

/// <summary>
/// Ctrl+C through the real host (`loraHub run`), as SIGINT from outside: the first stops training after the step with a
/// checkpoint and a message, the script goes on; a second ends the process at once (exit 130, as Ctrl+C always did).
/// </summary>
[Collection(Serial.Name)]
public sealed class CtrlCTests(ITestOutputHelper output)
{
    private static void Interrupt(Process process)
    {
        using var kill = Process.Start("kill", ["-INT", process.Id.ToString()]);
        kill.WaitForExit();
    }

    [Fact]
    public void The_first_sigint_stops_training_with_a_checkpoint_and_the_second_ends_the_process()
    {
        if (OperatingSystem.IsWindows()) return; // no SIGINT from outside there
        using var temp = new TempFolder("ctrl-c");
        var script = temp["user", "train.csx"];
        Directory.CreateDirectory(Path.GetDirectoryName(script)!);
        // Far more steps than it will run; after Train it waits, for the second Ctrl+C to end it.
        File.WriteAllText(script, """
            using LoRAHub.Models.Llama;
            using LoRAHub.Training.Data;
            var config = new LlamaConfig { VocabSize = 16, HiddenSize = 16, IntermediateSize = 32, NumHiddenLayers = 1, NumAttentionHeads = 2,
                NumKeyValueHeads = 2, MaxPositionEmbeddings = 16, RmsNormEps = 1e-5, BosTokenId = 1, PadTokenId = 0 };
            var model = LlamaForCausalLM.CreateRandom(config, device: CPU, seed: 0);
            var rows = Enumerable.Range(0, 8).Select(i => new TokenizedExample(new[] { 1, 3, 4, 5, 6 }, new[] { 1, 3, 4, 5, 6 })).ToList();
            var trainer = new Trainer(model, new FullFineTuning().Attach(model, new FullFineTuningOptions()),
                new TrainerOptions { OutputDir = Path.Combine(ScriptDirectory, "run"), MaxSteps = 100000, BatchSize = 2, ShowProgress = false }, Output);
            var result = trainer.Train(new TextDataset(rows));
            Output($"trained {result.Steps}");
            System.Threading.Thread.Sleep(TimeSpan.FromSeconds(60));
            Output("not interrupted");
            """);
        var sent = 0;
        var run = ChildProcess.Run(ChildProcess.Dotnet, [HostCli.HostDll, "run", "--device", "cpu", script], onLine: (line, process) =>
        {
            // Once training is under way, then once the script is past Train.
            if ((sent == 0 && line.StartsWith("step 3/", StringComparison.Ordinal)) || (sent == 1 && line.StartsWith("trained ", StringComparison.Ordinal)))
            {
                sent++;
                Interrupt(process);
            }
            return false;
        }, timeoutSeconds: 180, directory: temp["user"]);
        output.WriteLine($"exit {run.ExitCode}\n{run.Text}");

        Assert.False(run.TimedOut, "the host did not stop");
        Assert.Equal(2, sent);
        Assert.Contains("stopping after this step (Ctrl+C again to quit now)", run.Stderr);
        var stopped = run.Stdout.Single(l => l.StartsWith("stopped at step ", StringComparison.Ordinal));
        var step = long.Parse(stopped["stopped at step ".Length..stopped.IndexOf(';')]);
        Assert.InRange(step, 3, 99_999);
        Assert.Contains($"resume with Resume = true (checkpoint {Path.Combine(temp["user"], "run", $"checkpoint-{step:D6}")})", stopped);
        Assert.Contains($"trained {step}", run.Stdout);
        Assert.True(Directory.Exists(Path.Combine(temp["user"], "run", $"checkpoint-{step:D6}")));
        Assert.DoesNotContain("not interrupted", run.Stdout);
        Assert.Equal(130, run.ExitCode);
    }
}
