using System.Diagnostics;
using System.Globalization;
using LoRAHub.Safetensors;
using LoRAHub.Training.Checkpoints;
using Xunit.Abstractions;

namespace LoRAHub.Reliability.Tests;

/// <summary>
/// Kill-and-resume (issue 21, part 1). A child process trains (TrainChild: Llama + LoRA with dropout, checkpoint every
/// step) and is SIGKILLed at planned points inside every write of a checkpoint (LORAHUB_FAULT_AT, see WriteFaults):
/// the first byte, the middle and the last byte of each file, after each file is complete but before its rename, before
/// the checkpoint folder's rename, before pruning; and a few times from outside at arbitrary moments. After each kill
/// the next child resumes (and is killed at the next point), so one chain covers every point. Checked each time: the
/// resume starts from the last complete checkpoint, no folder under a checkpoint name fails its manifest, and every
/// loss the resumed run computes has the exact bits of the uninterrupted run; at the end the weights are bit-identical.
/// </summary>
[Collection(Serial.Name)]
public sealed class CrashConsistencyTests(ITestOutputHelper output)
{
    private const long Steps = 12;

    private sealed record Event(long Scope, int Index, string Name, long Bytes);

    private sealed record KillPoint(long Scope, int Index, string Name, string Byte)
    {
        public string Spec => $"{Scope}:{Index}:{Byte}";
    }

    [Fact]
    public void Kills_inside_every_checkpoint_write_resume_from_the_last_complete_checkpoint_with_the_exact_curve()
    {
        var clock = Stopwatch.StartNew();
        using var temp = new TempFolder("crash");

        // The uninterrupted run, traced: its losses (bits), final weights, and the numbered writes of each checkpoint.
        var reference = ChildProcess.Train(temp["reference"], Steps, ["resume"], new Dictionary<string, string> { [WriteFaults.TraceVariable] = "1" });
        Assert.True(reference.ExitCode == 0, reference.Text);
        var expected = Losses(reference.Stdout);
        Assert.Equal(Enumerable.Range(1, (int)Steps).Select(i => (long)i), expected.Keys.Order());
        var finalHash = Final(reference.Stdout);
        var events = Trace(reference.Stderr);

        var plan = Plan(events);
        var commitOf = events.Where(e => e.Name == "commit").ToDictionary(e => e.Scope, e => e.Index);
        var dir = temp["chain"];
        long lastComplete = 0;
        int kills = 0, exact = 0;
        var lines = new List<string>();

        void CheckResume(ChildProcess.Result run, long expectedStart, string what)
        {
            var losses = Losses(run.Stdout);
            Assert.True(losses.Count > 0 || expectedStart == Steps, $"{what}: the child computed no step\n{run.Text}");
            if (losses.Count > 0)
                Assert.True(losses.Keys.Min() == expectedStart + 1,
                    $"{what}: resumed at step {losses.Keys.Min() - 1}, but the last complete checkpoint is step {expectedStart}\n{run.Text}");
            foreach (var (step, bits) in losses)
                Assert.True(expected[step] == bits, $"{what}: step {step} loss {Show(bits)} differs from the uninterrupted run's {Show(expected[step])}");
            exact++;
        }

        void CheckDisk(string what)
        {
            // Nothing under a checkpoint name may be torn: each such folder matches its manifest.
            foreach (var folder in Directory.GetDirectories(dir, "checkpoint-*"))
                Assert.True(CheckpointManifest.Verify(folder) is null, $"{what}: {folder} is torn: {CheckpointManifest.Verify(folder)}");
        }

        var expectedStart = 0L;
        foreach (var point in plan)
        {
            var run = ChildProcess.Train(dir, Steps, ["resume"], new Dictionary<string, string> { [WriteFaults.Variable] = point.Spec });
            var what = $"kill at {point.Spec} ({point.Name} of step {point.Scope}'s checkpoint, byte {point.Byte})";
            Assert.True(run.Killed, $"{what}: the child was not killed (exit {run.ExitCode})\n{run.Text}");
            kills++;
            CheckResume(run, expectedStart, what);
            // The checkpoint of this step exists only if the kill came after its folder was renamed into place.
            lastComplete = point.Index > commitOf[point.Scope] ? point.Scope : point.Scope - 1;
            CheckDisk(what);
            expectedStart = lastComplete;
            lines.Add($"{point.Spec,-14} {point.Name,-28} → next resumes at step {lastComplete}");
        }

        var last = ChildProcess.Train(dir, Steps, ["resume"]);
        Assert.True(last.ExitCode == 0, last.Text);
        CheckResume(last, expectedStart, "final resume");
        Assert.Equal(finalHash, Final(last.Stdout));
        CheckDisk("end");

        // Kills from outside, at moments the child does not choose, in a second chain: after the loss line of a step is
        // read, the child is somewhere in that step's checkpoint or in the next step. The reader used to lag behind a fast
        // child, which could finish all its steps before the kill (a 2-core CI machine); now the child waits after each
        // loss line until the parent has read it (ChildProcess.Train, TrainChild.WaitAfterLoss), so the kill lands before
        // the child passes the next step's loss line: a kill step before the last is always reached.
        dir = temp["external"];
        expectedStart = 0;
        foreach (var afterStep in new long[] { 4, 7 })
        {
            Assert.True(afterStep < Steps, "the child must have a step left to be killed in");
            long seen = 0;
            var run = ChildProcess.Train(dir, Steps, ["resume"], onLine: (line, _) =>
            {
                if (!line.StartsWith("loss ", StringComparison.Ordinal)) return false;
                seen = long.Parse(line.Split(' ')[1], CultureInfo.InvariantCulture);
                return seen >= afterStep;
            });
            var what = $"external SIGKILL after step {afterStep}'s loss";
            Assert.True(run.Killed, $"{what}: the child was not killed (exit {run.ExitCode})\n{run.Text}");
            kills++;
            CheckResume(run, expectedStart, what);
            CheckDisk(what);
            // The loss line comes before that step's checkpoint, so the newest intact one is that step or the one before.
            var latest = new CheckpointManager(dir, 2).Latest();
            var latestStep = latest is null ? 0 : long.Parse(Path.GetFileName(latest)["checkpoint-".Length..], CultureInfo.InvariantCulture);
            Assert.True(latestStep >= seen - 1, $"{what}: newest intact checkpoint is step {latestStep}, but the child had reported step {seen}");
            expectedStart = latestStep;
            lines.Add($"external after loss {seen,-4}                         → next resumes at step {latestStep}");
        }
        last = ChildProcess.Train(dir, Steps, ["resume"]);
        Assert.True(last.ExitCode == 0, last.Text);
        CheckResume(last, expectedStart, "final resume after external kills");
        Assert.Equal(finalHash, Final(last.Stdout));

        output.WriteLine(string.Join("\n", lines));
        output.WriteLine($"crash consistency: {events.Count(e => e.Scope == Steps && e.Index > 0)} durable steps per checkpoint (its files, rename, prune), {plan.Count} planned kill points, kills tried {kills}, " +
                         $"resumes exact {exact - 2}/{kills} (+ 2 final resumes exact), torn checkpoints loaded 0, final weights bit-identical; {clock.Elapsed.TotalSeconds:0.0} s");
        Assert.True(kills >= 25, $"only {kills} kills");
    }

    /// <summary>
    /// Every write of a checkpoint at its first byte, its middle, its last byte and after it is complete (flushed, not yet
    /// renamed); the named points (commit: before the folder's rename; prune: after it) and the scope's opening; and the
    /// first checkpoint once (nothing to fall back on: the resume starts over). Offsets come from the traced size of that
    /// very write (trainer_state.json grows with the loss history). Points go to steps 3, 4, ... a few per step; a point
    /// at a later step lets the resumed child complete the earlier steps first.
    /// </summary>
    private static List<KillPoint> Plan(List<Event> events)
    {
        var steady = events.Where(e => e.Scope == Steps).ToList();
        Assert.Contains(steady, e => e.Name == "commit");
        Assert.Contains(steady, e => e.Name == "prune");
        var commit = steady.Single(e => e.Name == "commit").Index;
        // (event index, which byte) with the byte as a function of the write's size in the scope it lands in.
        var kinds = new List<(int Index, Func<long, string> Byte)> { (0, _ => "0") };
        foreach (var e in steady.Where(e => e.Index > 0))
        {
            if (e.Bytes <= 0)
            {
                kinds.Add((e.Index, _ => "0"));
                continue;
            }
            kinds.Add((e.Index, _ => "0"));
            kinds.Add((e.Index, size => (size / 2).ToString(CultureInfo.InvariantCulture)));
            kinds.Add((e.Index, size => (size - 1).ToString(CultureInfo.InvariantCulture)));
            kinds.Add((e.Index, _ => "end"));
        }
        // Post-commit points last in their step: a kill there completes the step's checkpoint.
        kinds = [.. kinds.Where(k => k.Index <= commit), .. kinds.Where(k => k.Index > commit)];

        var first = events.Single(e => e.Scope == 1 && e.Name == "trainable.safetensors");
        var plan = new List<KillPoint> { new(1, first.Index, first.Name, "1") };
        var perStep = (int)Math.Ceiling(kinds.Count / (double)(Steps - 3));
        for (var i = 0; i < kinds.Count; i++)
        {
            var step = 3 + i / perStep;
            var e = events.Single(x => x.Scope == step && x.Index == kinds[i].Index);
            plan.Add(new KillPoint(step, e.Index, e.Name, kinds[i].Byte(e.Bytes)));
        }
        // Within a step, a post-commit point must come last (it moves the chain on).
        return plan.OrderBy(p => p.Scope).ThenBy(p => p.Index > commit).ToList();
    }

    private static Dictionary<long, string> Losses(IEnumerable<string> stdout)
    {
        var result = new Dictionary<long, string>();
        foreach (var line in stdout.Where(l => l.StartsWith("loss ", StringComparison.Ordinal)))
        {
            var parts = line.Split(' ');
            result[long.Parse(parts[1], CultureInfo.InvariantCulture)] = parts[2];
        }
        return result;
    }

    private static string Final(IEnumerable<string> stdout) =>
        stdout.Single(l => l.StartsWith("final ", StringComparison.Ordinal)).Split(' ')[2];

    private static List<Event> Trace(string stderr)
    {
        var events = new Dictionary<(long, int), Event>();
        foreach (var line in stderr.Split('\n').Where(l => l.StartsWith("fault-trace ", StringComparison.Ordinal)))
        {
            var p = line.Trim().Split(' ');
            var key = (long.Parse(p[1], CultureInfo.InvariantCulture), int.Parse(p[2], CultureInfo.InvariantCulture));
            var bytes = p[4] == "end" ? long.Parse(p[5], CultureInfo.InvariantCulture) : 0;
            events[key] = new Event(key.Item1, key.Item2, p[3], Math.Max(bytes, events.TryGetValue(key, out var e) ? e.Bytes : 0));
        }
        return events.Values.OrderBy(e => e.Scope).ThenBy(e => e.Index).ToList();
    }

    private static string Show(string bits) => $"{BitConverter.Int64BitsToDouble(long.Parse(bits, NumberStyles.HexNumber)):R} (0x{bits})";
}
