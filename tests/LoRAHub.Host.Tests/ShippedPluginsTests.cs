using System.Xml.Linq;
using LoRAHub.Host.Commands;

namespace LoRAHub.Host.Tests;

/// <summary>
/// Every method plugin in plugins/, as the solution build leaves it, loads in the real host in its own load context
/// (some carry private copies of the LoRA plugin): `loraHub methods` lists each one and reports none broken.
/// </summary>
public sealed class ShippedPluginsTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    [Fact]
    public void Every_shipped_plugin_loads_in_the_host()
    {
        var repo = HostProcess.RepoRoot();
        // The configuration this suite was built in is the one the solution build produced the plugins in.
        var configuration = AppContext.BaseDirectory.Contains($"{Path.DirectorySeparatorChar}Debug{Path.DirectorySeparatorChar}") ? "Debug" : "Release";
        var expected = new Dictionary<string, string>
        {
            ["LoRA"] = "lora", ["DoRA"] = "dora", ["HeadLoRA"] = "headlora", ["QLoRA"] = "qlora", ["GaLore"] = "galore", ["LongLoRA"] = "longlora", ["AdaLoRA"] = "adalora", ["MALoRA"] = "malora",
        };
        foreach (var folder in Directory.GetDirectories(Path.Combine(repo, "plugins")))
        {
            var project = Directory.GetFiles(folder, "*.csproj").Single();
            var assembly = XDocument.Load(project).Descendants("AssemblyName").Single().Value;
            Assert.True(expected.ContainsKey(assembly), $"plugins/{Path.GetFileName(folder)} ({assembly}) is not in this test's list: add its method name");
            var built = Path.Combine(folder, "bin", configuration, "net10.0");
            Assert.True(File.Exists(Path.Combine(built, assembly + ".dll")), $"{built} has no {assembly}.dll: build the solution in {configuration} first");
            HostProcess.CopyFolder(built, temp.Combine("plugins", assembly));
        }

        var run = HostProcess.Run("dotnet", [typeof(LoRAHubCli).Assembly.Location, "methods"], temp.Path, new()
        {
            ["LORAHUB_PLUGIN_PATH"] = temp.Combine("plugins"),
        });

        Assert.True(run.Code == 0, run.Output);
        Assert.DoesNotContain("Broken plugins", run.Output);
        var listed = run.Output.Split('\n').Select(l => l.Split(' ', 2)[0].Trim()).ToHashSet();
        foreach (var method in expected.Values) Assert.True(listed.Contains(method), $"'{method}' is not listed:\n{run.Output}");
    }
}
