using LoRAHub.Host.Plugins;
using LoRAHub.Host.Scripting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging.Abstractions;
using static TorchSharp.torch;

namespace LoRAHub.Host.Tests;

public sealed class ScriptRunnerTests : IDisposable
{
    private readonly TempFolder temp = new();
    private readonly ScriptRunner runner;

    public ScriptRunnerTests()
    {
        var references = ScriptReferences.CreateDefault(AppContext.BaseDirectory);
        runner = new ScriptRunner(new ScriptCompiler(references, new ScriptCache(temp.Combine("cache")), NullLogger<ScriptCompiler>.Instance));
    }

    public void Dispose() => temp.Dispose();

    private Task<(ScriptRunResult Result, string Output, string Error)> Run(string script, params string[] args) =>
        Run(script, CancellationToken.None, args);

    private async Task<(ScriptRunResult Result, string Output, string Error)> Run(string script, CancellationToken cancellation, params string[] args)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        var result = await runner.RunAsync(script, directory => new ScriptHost(args, new MethodRegistry([], []), "lora", CPU,
            NullLogger.Instance, new ServiceCollection().BuildServiceProvider(), directory, output, cancellation), error);
        return (result, output.ToString(), error.ToString());
    }

    [Fact]
    public async Task Compile_error_reports_file_line_and_column()
    {
        var script = temp.Write("broken.csx", "var x = 1;\nOutput(undefinedName);\n");

        var (result, _, error) = await Run(script);

        Assert.Equal(ExitCodes.ScriptError, result.ExitCode);
        Assert.Contains($"{script}(2,8): error CS0103:", error);
    }

    [Fact]
    public async Task Scripts_can_use_dynamic()
    {
        var script = temp.Write("dynamic.csx", """
            dynamic options = new { r = 16 };
            dynamic n = 2;
            Output($"{options.r * n}");
            """);

        var (result, output, error) = await Run(script);

        Assert.True(result.ExitCode == ExitCodes.Ok, error);
        Assert.Equal("32\n", output.ReplaceLineEndings("\n"));
    }

    [Fact]
    public async Task TorchSharp_s_matmul_gets_a_warning_with_its_place_and_torchx_matmul_none()
    {
        var script = temp.Write("matmul.csx", """
            using static TorchSharp.torch;
            var a = torch.ones([2, 3]);
            var b = a.matmul(torch.ones([3, 2]));
            var c = matmul(a, torch.ones([3, 4]));
            var d = torchx.matmul(a, torch.ones([3, 5]));
            Output($"{b.shape[1]} {c.shape[1]} {d.shape[1]}");
            """);

        var (result, output, error) = await Run(script);

        Assert.True(result.ExitCode == ExitCodes.Ok, error);
        Assert.Equal("2 4 5\n", output.ReplaceLineEndings("\n"));
        var warnings = error.ReplaceLineEndings("\n").TrimEnd().Split('\n');
        Assert.Equal([$"{script}(3,9): warning LH0001:", $"{script}(4,9): warning LH0001:"], warnings.Select(w => w[..(w.IndexOf("LH0001:") + 7)]));
        Assert.All(warnings, w => Assert.Contains("torchx.matmul(a, b)", w));
        // The warning comes with the compilation: a second run loads the cached assembly and stays quiet.
        Assert.Equal("", (await Run(script)).Error);
    }

    [Fact]
    public async Task Args_globals_and_default_imports_reach_the_script()
    {
        var script = temp.Write("args.csx", """
            Output(string.Join("|", Args) + $" method={MethodName} device={Device} dir={ScriptDirectory}");
            var t = torch.ones([2, 3]);
            Output($"numel={t.numel()} contract={ContractVersion.Text}");
            t.Dispose();
            """);

        var (result, output, error) = await Run(script, "--lr", "3e-4", "data.jsonl");

        Assert.True(result.ExitCode == ExitCodes.Ok, error);
        Assert.Equal($"--lr|3e-4|data.jsonl method=lora device=cpu dir={temp.Path}\nnumel=6 contract=2.0\n", output.ReplaceLineEndings("\n"));
    }

    [Fact]
    public async Task Scripts_see_TorchSharp_types_and_torchx_for_what_TorchSharp_lacks()
    {
        // A plain TorchSharp module written in the script, trained one step with our AdamW, normalised with torchx.
        var script = temp.Write("torchsharp.csx", """
            sealed class Net : nn.Module<Tensor, Tensor>
            {
                private readonly nn.Module<Tensor, Tensor> fc = nn.Linear(4, 2);
                public Net() : base("Net") => RegisterComponents();
                public override Tensor forward(Tensor x) => fc.call(x);
            }
            var net = new Net();
            var x = torch.ones(3, 4);
            var optimizer = new AdamW(net.parameters(), lr: 0.1);
            var before = net.parameters().First().clone();
            net.call(x).sum().backward();
            optimizer.step();
            var normed = torchx.nn.functional.rms_norm(x, eps: 1e-6);
            Output($"{typeof(Tensor).FullName} {net is nn.Module} {net.named_parameters().Count()} moved={!torch.equal(before, net.parameters().First()).all().item<bool>()} rms={normed.pow(2).mean().item<float>():0.000}");
            """);

        var (result, output, error) = await Run(script);

        Assert.True(result.ExitCode == ExitCodes.Ok, error);
        Assert.Equal("TorchSharp.torch+Tensor True 2 moved=True rms=1.000", output.Trim());
    }

    [Fact]
    public async Task Load_directive_resolves_relative_to_the_including_file()
    {
        temp.Write("lib/math.csx", "#load \"more.csx\"\nint Twice(int x) => Add(x, x);\n");
        temp.Write("lib/more.csx", "int Add(int a, int b) => a + b;\n");
        var script = temp.Write("main.csx", "#load \"lib/math.csx\"\nOutput(Twice(21).ToString());\n");

        var (result, output, error) = await Run(script);

        Assert.True(result.ExitCode == ExitCodes.Ok, error);
        Assert.Equal("42", output.Trim());
    }

    [Fact]
    public async Task Second_run_loads_from_cache_and_a_changed_load_file_recompiles()
    {
        temp.Write("helper.csx", "string Greeting() => \"hello\";\n");
        var script = temp.Write("cached.csx", "#load \"helper.csx\"\nOutput(Greeting());\n");

        var first = await Run(script);
        var second = await Run(script);
        temp.Write("helper.csx", "string Greeting() => \"changed\";\n");
        var third = await Run(script);

        Assert.False(first.Result.Script!.FromCache);
        Assert.True(second.Result.Script!.FromCache);
        Assert.Equal("hello", second.Output.Trim());
        Assert.False(third.Result.Script!.FromCache);
        Assert.Equal("changed", third.Output.Trim());
    }

    [Fact]
    public async Task Train_without_a_token_stops_on_the_hosts_cancellation_with_a_checkpoint_and_ends_the_script()
    {
        // What Ctrl+C does (ConsoleCancellation cancels the token the host hands the script): here cancelled before the
        // run, so the first step is the last; the script passes no token to Train, so it ends there (exit 130).
        var script = temp.Write("train.csx", TrainingScripts.Tiny(maxSteps: 50));
        using var ctrlC = new CancellationTokenSource();
        ctrlC.Cancel();

        var (result, output, error) = await Run(script, ctrlC.Token);

        Assert.True(result.ExitCode == ExitCodes.Interrupted, error);
        var checkpoint = temp.Combine("run", "checkpoint-000001");
        Assert.Equal($"stopped at step 1; to continue, run again with Resume = true (checkpoint {checkpoint})", error.Trim());
        Assert.DoesNotContain("trained ", output);
        Assert.True(Directory.Exists(checkpoint));
        Assert.False(LoRAHub.Training.TrainingCancellation.Current.CanBeCanceled); // the run's token does not outlive it
    }

    [Fact]
    public async Task Train_given_the_token_returns_at_the_stop_and_the_script_goes_on()
    {
        // A script that wants to go on after Ctrl+C (save, evaluate) passes the token itself.
        var script = temp.Write("train-token.csx", TrainingScripts.Tiny("new TextDataset(rows), cancellation: Cancellation", maxSteps: 50));
        using var ctrlC = new CancellationTokenSource();
        ctrlC.Cancel();

        var (result, output, error) = await Run(script, ctrlC.Token);

        Assert.True(result.ExitCode == ExitCodes.Ok, error);
        var checkpoint = temp.Combine("run", "checkpoint-000001");
        Assert.Contains($"stopped at step 1; resume with Resume = true (checkpoint {checkpoint})", output);
        Assert.Contains("trained 1 (stopped True)", output);
        Assert.True(Directory.Exists(checkpoint));
    }

    [Fact]
    public async Task Runtime_exception_reports_type_message_and_script_line()
    {
        var script = temp.Write("throws.csx", "Output(\"before\");\nvar n = Args.Length;\nthrow new InvalidOperationException($\"bad input {n}\");\n");

        var (result, output, error) = await Run(script);

        Assert.Equal(ExitCodes.ScriptError, result.ExitCode);
        Assert.Equal("before", output.Trim());
        Assert.StartsWith($"{script}(3,1): error: unhandled System.InvalidOperationException: bad input 0", error);
    }

    [Fact]
    public async Task Runtime_exception_from_cached_script_still_has_the_line()
    {
        var script = temp.Write("throws.csx", "void Fail() =>\n    throw new ArgumentException(\"nope\");\nFail();\n");

        await Run(script);
        var (result, _, error) = await Run(script);

        Assert.True(result.Script!.FromCache);
        Assert.StartsWith($"{script}(2,5): error: unhandled System.ArgumentException: nope", error);
    }

    [Fact]
    public async Task Wrapped_exception_reports_the_innermost_cause_and_its_script_line()
    {
        var script = temp.Write("wrapped.csx", """
            Action fail = () => throw new InvalidDataException("the real cause");
            fail.Method.Invoke(fail.Target, null);
            """);

        var (result, _, error) = await Run(script);

        Assert.Equal(ExitCodes.ScriptError, result.ExitCode);
        Assert.StartsWith($"{script}(1,", error);
        Assert.Contains("error: unhandled System.Reflection.TargetInvocationException: ", error);
        Assert.Contains("---> System.IO.InvalidDataException: the real cause", error);
    }
}
