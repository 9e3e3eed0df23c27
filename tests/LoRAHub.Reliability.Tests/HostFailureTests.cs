using Xunit.Abstractions;

namespace LoRAHub.Reliability.Tests;

/// <summary>
/// Process-level bad input (issue 21, part 2): scripts that do not compile or throw, plugins that throw in their
/// constructor, Attach or a training hook — through the real host. Each must end with a clear error (file and line for
/// scripts, plugin and reason for plugins) and exit code 1 (or a broken-plugin entry), never a crash or a hang, and
/// leave the user's files as they were.
/// </summary>
[Collection(Serial.Name)]
public sealed class HostFailureTests(ITestOutputHelper output)
{
    private static readonly string BaseModel = Path.Combine(Corpus.ModelCases.RepoRoot(), "examples", "base-model");

    private (ChildProcess.Result Run, bool Unchanged) Script(TempFolder temp, string body, string? pluginPath = null)
    {
        var script = temp["user", "train.csx"];
        Directory.CreateDirectory(Path.GetDirectoryName(script)!);
        File.WriteAllText(script, body);
        var before = HostCli.Hashes(temp["user"]);
        var env = new Dictionary<string, string> { ["LORAHUB_PLUGIN_PATH"] = pluginPath ?? "" };
        var run = HostCli.Run(temp["user"], env, "run", "--device", "cpu", script);
        output.WriteLine($"exit {run.ExitCode}: {run.Stderr.Trim().Split('\n').LastOrDefault(l => l.Contains("error"))}");
        var after = HostCli.Hashes(temp["user"]).Where(kv => before.ContainsKey(kv.Key)).ToDictionary();
        return (run, before.Count == after.Count && before.All(kv => after[kv.Key] == kv.Value));
    }

    private static void AssertCleanFailure(ChildProcess.Result run, bool unchanged, params string[] expected)
    {
        Assert.False(run.TimedOut, "the host hung");
        Assert.True(run.ExitCode == 1, $"exit code {run.ExitCode} (1 expected: a script error, not a crash)\n{run.Text}");
        foreach (var text in expected) Assert.Contains(text, run.Text);
        Assert.DoesNotContain("Unhandled exception", run.Text);
        Assert.True(unchanged, "the run modified the user's files");
    }

    [Fact]
    public void A_script_that_does_not_compile_names_its_line()
    {
        using var temp = new TempFolder("host-compile");
        var (run, unchanged) = Script(temp, "var x = 1;\nvar y = x +;\n");
        AssertCleanFailure(run, unchanged, "train.csx(2,", "error CS");
    }

    [Fact]
    public void A_script_that_throws_names_its_line_and_the_message()
    {
        using var temp = new TempFolder("host-throw");
        var (run, unchanged) = Script(temp, "Output(\"start\");\nthrow new InvalidOperationException(\"user script failed\");\n");
        AssertCleanFailure(run, unchanged, "train.csx(2,", "user script failed");
    }

    [Fact]
    public void Bad_data_through_a_script_names_the_file_and_line()
    {
        using var temp = new TempFolder("host-data");
        File.WriteAllText(Path.Combine(Directory.CreateDirectory(temp["user"]).FullName, "data.jsonl"), "{\"text\": \"abc\"}\n{\"text\": 5}\n");
        var (run, unchanged) = Script(temp, $$"""
            var tok = Tokenizer.FromFolder(@"{{BaseModel}}");
            var data = TextDataset.LoadJsonl(Path.Combine(ScriptDirectory, "data.jsonl"), tok);
            """);
        AssertCleanFailure(run, unchanged, "data.jsonl:2:", "'text' must be a string");
    }

    [Fact]
    public void A_plugin_that_throws_in_its_constructor_is_listed_as_broken_and_the_others_still_load()
    {
        using var temp = new TempFolder("host-ctor");
        var plugin = HostCli.Plugin(temp["plugins"], "FaultyCtor", HostCli.FaultySource("faulty-ctor", "constructor"));
        var run = HostCli.Run(temp.Path, new Dictionary<string, string> { ["LORAHUB_PLUGIN_PATH"] = plugin }, "methods");
        Assert.False(run.TimedOut);
        Assert.True(run.ExitCode == 0, run.Text);
        Assert.Contains("FaultyCtor", run.Text);
        Assert.Contains("boom in constructor", run.Text);
        Assert.Contains("full", run.Text); // the built-in method is still there
    }

    [Fact]
    public void A_plugin_that_throws_in_attach_or_a_training_hook_fails_the_script_with_its_message()
    {
        using var temp = new TempFolder("host-attach");
        var plugins = string.Join(Path.PathSeparator, HostCli.Plugin(temp["plugins"], "FaultyAttach", HostCli.FaultySource("faulty-attach", "attach")),
            HostCli.Plugin(temp["plugins"], "FaultyHook", HostCli.FaultySource("faulty-hook", "hook")));
        string Body(string method) => $$"""
            using LoRAHub.Training.Data;
            var model = PretrainedModel.LoadLlama(@"{{BaseModel}}");
            var adapter = Method("{{method}}").Attach(model, new object());
            var rows = Enumerable.Range(0, 8).Select(i => new TokenizedExample(new[] { 1, 3, 4, 5, 6 }, new[] { 1, 3, 4, 5, 6 })).ToList();
            var trainer = new Trainer(model, adapter, new TrainerOptions { OutputDir = Path.Combine(ScriptDirectory, "run"), MaxSteps = 4, BatchSize = 2, ShowProgress = false });
            trainer.Train(new TextDataset(rows));
            """;
        var (attach, attachUnchanged) = Script(temp, Body("faulty-attach"), plugins);
        AssertCleanFailure(attach, attachUnchanged, "train.csx(3,", "boom in attach");
        var (hook, hookUnchanged) = Script(temp, Body("faulty-hook"), plugins);
        AssertCleanFailure(hook, hookUnchanged, "train.csx(6,", "boom in hook");
    }
}
