using LoRAHub.Host.Commands;

namespace LoRAHub.Host.Tests;

public sealed class CliTests : IDisposable
{
    private readonly TempFolder temp = new();

    public CliTests() =>
        // The host's appsettings.json (in its base folder) points the script cache into the test folder.
        temp.Write("host/appsettings.json", $$"""{ "ScriptCache": "{{temp.Combine("cache").Replace("\\", "\\\\")}}" }""");

    public void Dispose() => temp.Dispose();

    private async Task<(int Code, string Output, string Error)> Cli(params string[] args)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        var code = await new LoRAHubCli(output, error, temp.Combine("host")).InvokeAsync(args);
        return (code, output.ToString(), error.ToString());
    }

    [Fact]
    public async Task Unknown_command_is_a_usage_error()
    {
        var (code, _, error) = await Cli("frobnicate");

        Assert.Equal(ExitCodes.UsageError, code);
        Assert.Contains("frobnicate", error);
        Assert.Contains("Run 'dotnet loraHub --help' for usage.", error);
    }

    [Fact]
    public async Task Missing_script_is_a_usage_error()
    {
        var (code, _, error) = await Cli("run", temp.Combine("nope.csx"));

        Assert.Equal(ExitCodes.UsageError, code);
        Assert.Contains("script not found", error);
    }

    [Fact]
    public async Task Bad_device_is_a_usage_error()
    {
        var script = temp.Write("ok.csx", "Output(\"hi\");");

        var (code, _, error) = await Cli("run", "--device", "tpu", script);

        Assert.Equal(ExitCodes.UsageError, code);
        Assert.Contains("unknown device 'tpu'", error);
    }

    [Fact]
    public async Task Cuda_device_without_cuda_is_a_usage_error_that_says_how_to_get_it()
    {
        if (TorchSharp.torch.cuda.is_available()) return; // the error is for machines without CUDA
        var script = temp.Write("ok.csx", "Output(\"hi\");");

        var (code, output, error) = await Cli("run", "--device", "cuda:0", script);

        Assert.Equal(ExitCodes.UsageError, code);
        Assert.Contains("CUDA is not available", error);
        Assert.Contains("LORAHUB_LIBTORCH", error);
        Assert.Equal("", output);
    }

    [Fact]
    public async Task Run_passes_host_options_to_globals_and_everything_after_the_script_to_Args()
    {
        var script = temp.Write("echo.csx", "Output($\"{MethodName}|{Device}|{string.Join(',', Args)}\");");

        var (code, output, error) = await Cli("-v", "run", "--method", "Full", "--device", "cpu", script, "a", "--device", "b", "-v");

        Assert.True(code == ExitCodes.Ok, error);
        Assert.Equal("Full|cpu|a,--device,b,-v", output.Trim());
        Assert.Contains("compiled in", error);
        Assert.True(File.Exists(Directory.GetFiles(temp.Combine("cache"), "*.dll").Single()));

        var again = await Cli("--verbose", "run", "--method", "Full", "--device", "cpu", script);
        Assert.Contains("loaded from cache in", again.Error);
    }

    [Fact]
    public async Task A_scripts_Log_shows_Information_without_verbose_and_Debug_with_it()
    {
        var script = temp.Write("log.csx", "Output($\"{Log.IsEnabled(LogLevel.Information)}|{Log.IsEnabled(LogLevel.Debug)}\");");

        var quiet = await Cli("run", "--device", "cpu", script);
        var verbose = await Cli("-v", "run", "--device", "cpu", script);

        Assert.True(quiet.Code == ExitCodes.Ok, quiet.Error);
        Assert.Equal("True|False", quiet.Output.Trim());
        Assert.Equal("True|True", verbose.Output.Trim());
    }

    [Fact]
    public async Task Script_failure_exits_with_1()
    {
        var script = temp.Write("fail.csx", "throw new Exception(\"x\");");

        var (code, _, _) = await Cli("run", script);

        Assert.Equal(ExitCodes.ScriptError, code);
    }

    [Fact]
    public async Task Methods_lists_loaded_and_broken_plugins()
    {
        TestPluginCompiler.Plugin(temp.Combine("host", "plugins"), "Alpha", TestPluginCompiler.MethodSource("alpha", "\"first method\""));
        temp.Write("host/plugins/Empty/notes.txt", "");

        var (code, output, _) = await Cli("methods");

        Assert.Equal(ExitCodes.Ok, code);
        var lines = output.ReplaceLineEndings("\n").Split('\n');
        Assert.Matches(@"^alpha\s+3\.2\.1\s+2\.0\s+first method\s+.*Alpha$", lines[1]);
        Assert.Contains(lines, l => l.StartsWith("  Empty: missing plugin assembly", StringComparison.Ordinal));
    }

    [Fact]
    public async Task Info_reports_libtorch_version()
    {
        var (code, output, _) = await Cli("info");

        Assert.Equal(ExitCodes.Ok, code);
        Assert.Matches(@"libtorch: \d+\.\d+", output);
        Assert.Matches(@"CUDA devices: \d+", output);
        // The libtorch named is the one mapped into this process, not TorchSharp's compile-time version string.
        var loaded = Assert.Single(LoRAHub.TorchExtensions.LoadedLibraries.Find("libtorch_cpu.so"));
        Assert.Contains($"({loaded};", output);
        Assert.Contains("our CUDA kernels: ", output);
    }

    [Fact]
    public async Task Host_options_after_the_script_reach_the_script_with_a_note_on_where_they_belong()
    {
        var script = temp.Write("echo.csx", "Output($\"{MethodName ?? \"none\"}|{string.Join(',', Args)}\");");

        var (code, output, error) = await Cli("run", script, "100", "--method", "galore", "--verbose");

        Assert.True(code == ExitCodes.Ok, error);
        Assert.Equal("none|100,--method,galore,--verbose", output.Trim());
        Assert.Contains("note: '--method', '--verbose' come after the script, so the script receives them in Args; " +
            $"put the host's options before the script: dotnet loraHub run --method galore --verbose {script} 100", error);

        var plain = await Cli("run", script, "100", "--lr", "3e-4");
        Assert.DoesNotContain("note:", plain.Error);
    }

    [Fact]
    public async Task An_unknown_method_fails_before_the_script_runs_and_lists_the_methods()
    {
        var script = temp.Write("slow.csx", "Output(\"ran\");");

        var (code, output, error) = await Cli("run", "--method", "nope", script);

        Assert.Equal(ExitCodes.UsageError, code);
        Assert.Equal("", output);
        Assert.StartsWith("error: --method nope: no adaptation method named 'nope'; available: full", error);
        Assert.Contains("dotnet loraHub methods", error);
    }

    [Fact]
    public async Task A_plugins_folder_that_does_not_exist_is_an_error_and_one_without_plugins_a_note()
    {
        var missing = await Cli("--plugins", temp.Combine("no-such-plugins"), "methods");
        Assert.Equal(ExitCodes.UsageError, missing.Code);
        Assert.Contains($"error: --plugins folder {temp.Combine("no-such-plugins")} does not exist", missing.Error);

        Directory.CreateDirectory(temp.Combine("empty-plugins"));
        var empty = await Cli("--plugins", temp.Combine("empty-plugins"), "methods");
        Assert.Equal(ExitCodes.Ok, empty.Code);
        Assert.Contains($"note: no method plugins in {temp.Combine("empty-plugins")} (--plugins)", empty.Error);
    }

    [Fact]
    public void Errors_of_bad_input_print_their_message_alone_and_unexpected_ones_their_type_too()
    {
        Assert.Equal("bad data", LoRAHubCli.Describe(new InvalidDataException("bad data")));
        Assert.Equal("no such file", LoRAHubCli.Describe(new FileNotFoundException("no such file")));
        Assert.Equal("in use", LoRAHubCli.Describe(new IOException("in use")));
        Assert.Equal("bad value", LoRAHubCli.Describe(new ArgumentException("bad value")));
        Assert.Equal("refused", LoRAHubCli.Describe(new LoRAHub.Abstractions.AdapterConfigurationException("refused")));
        Assert.Equal("NullReferenceException: oops", LoRAHubCli.Describe(new NullReferenceException("oops")));
        Assert.Equal("InvalidOperationException: state", LoRAHubCli.Describe(new InvalidOperationException("state")));
    }
}
