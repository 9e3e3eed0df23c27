namespace LoRAHub.Host.Tests;

/// <summary>
/// Plugins compile against TorchSharp but ship none of it: the host provides TorchSharp.dll and one libtorch. A plugin
/// folder that carried its own copy would put a second TorchSharp (other types) or libtorch (500 MB) next to the host's.
/// </summary>
public sealed class PluginFoldersCarryNoTorchTests
{
    private static bool IsTorchFile(string path) =>
        Path.GetFileName(path) is var name
        && (name.StartsWith("libtorch", StringComparison.OrdinalIgnoreCase)
            || name.StartsWith("torch_", StringComparison.OrdinalIgnoreCase)             // Windows: torch_cpu.dll, torch_cuda.dll
            || name.Contains("LibTorchSharp", StringComparison.OrdinalIgnoreCase)
            || name.Equals("TorchSharp.dll", StringComparison.OrdinalIgnoreCase)
            || name.StartsWith("libc10", StringComparison.OrdinalIgnoreCase) || name.StartsWith("c10.", StringComparison.OrdinalIgnoreCase));

    private static List<string> TorchFiles(string folder) =>
        Directory.EnumerateFiles(folder, "*", SearchOption.AllDirectories).Where(IsTorchFile).ToList();

    [Fact]
    public void No_plugin_build_output_or_published_plugin_folder_holds_TorchSharp_or_libtorch()
    {
        var repo = HostProcess.RepoRoot();
        var configuration = AppContext.BaseDirectory.Contains($"{Path.DirectorySeparatorChar}Debug{Path.DirectorySeparatorChar}") ? "Debug" : "Release";
        var folders = new List<string>();
        foreach (var plugin in Directory.GetDirectories(Path.Combine(repo, "plugins")))
        {
            var built = Path.Combine(plugin, "bin", configuration, "net10.0");
            Assert.True(Directory.Exists(built), $"{built} is missing: build the solution in {configuration} first");
            folders.Add(built);
        }
        // The third-party sample is outside the solution: checked wherever it has been built (BitFitSampleTests builds it).
        var sample = Path.Combine(repo, "samples", "BitFit", "bin");
        if (Directory.Exists(sample)) folders.AddRange(Directory.GetDirectories(sample, "net10.0", SearchOption.AllDirectories));
        // setup.sh's layout, when it has run (CI runs it before the tests).
        var published = Path.Combine(repo, "artifacts", "host", "plugins");
        if (Directory.Exists(published)) folders.AddRange(Directory.GetDirectories(published));

        var offenders = folders.SelectMany(TorchFiles).ToList();
        Assert.True(offenders.Count == 0, "plugin folders carry TorchSharp/libtorch files:\n" + string.Join("\n", offenders));
    }

    [Fact]
    public void The_check_recognises_torch_files()
    {
        // The guard above is only as good as its name test: it must match what NuGet's packages actually ship.
        Assert.True(IsTorchFile("/x/runtimes/linux-x64/native/libtorch_cpu.so"));
        Assert.True(IsTorchFile("/x/libLibTorchSharp.so"));
        Assert.True(IsTorchFile("/x/TorchSharp.dll"));
        Assert.True(IsTorchFile("/x/libc10.so"));
        Assert.False(IsTorchFile("/x/LoRAHub.Plugins.LoRA.dll"));
        Assert.False(IsTorchFile("/x/LoRAHub.TorchExtensions.dll"));
    }
}
