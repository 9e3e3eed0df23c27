using LoRAHub.Abstractions;
using LoRAHub.Host.Plugins;

namespace LoRAHub.Host.Tests;

using static TestPluginCompiler;

public sealed class PluginLoaderTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    private static MethodRegistry Load(params string[] folders) => new PluginLoader().Load(folders);

    private BrokenPlugin BrokenOnly(MethodRegistry registry, string pluginName) =>
        Assert.Single(registry.Broken, b => b.PluginName == pluginName);

    [Fact]
    public void Discovery_takes_built_plugin_folders_and_skips_source_folders()
    {
        var hostBase = temp.Combine("host");
        var user = temp.Combine("user");
        Plugin(Path.Combine(hostBase, "plugins"), "Alpha", MethodSource("alpha"));
        Plugin(user, "Beta", MethodSource("beta"));
        temp.Write("user/Source/Source.csproj", "<Project />");                       // a source folder: no DLL, no deps.json
        Plugin(temp.Combine("checkout", "plugins"), "Planted", MethodSource("planted")); // the current directory's plugins/ is never searched
        temp.Write("extra/Gamma/Gamma.deps.json", "{}");                               // a plugin folder in a folder of them
        Plugin(temp.Combine("single"), "Delta", MethodSource("delta"));                 // a plugin folder named directly
        var pluginPath = string.Join(Path.PathSeparator, temp.Combine("extra"), temp.Combine("single", "Delta"));

        var folders = PluginFolders.Discover(hostBase, user, pluginPath);

        Assert.Equal(
            [Path.Combine(hostBase, "plugins", "Alpha"), Path.Combine(user, "Beta"), temp.Combine("extra", "Gamma"), temp.Combine("single", "Delta")],
            folders);
    }

    [Fact]
    public void Loaded_methods_are_found_by_case_insensitive_name_with_their_origin()
    {
        var folder = Plugin(temp.Path, "Alpha", MethodSource("alpha", "\"the alpha method\""));

        var registry = Load(folder);

        var method = Assert.Single(registry.All);
        Assert.Same(method.Method, registry.Get("ALPHA"));
        Assert.Equal(("alpha", "the alpha method", "Alpha", folder, "3.2.1", "2.0"),
            (method.Name, method.Description, method.PluginName, method.Folder, method.Version, method.ContractVersion));
        Assert.Empty(registry.Broken);
        var error = Assert.Throws<KeyNotFoundException>(() => registry.Get("lora"));
        Assert.Contains("available: alpha", error.Message);
    }

    [Fact]
    public void Plugins_with_different_versions_of_one_private_library_each_see_their_own()
    {
        const string library = """
            [assembly: System.Reflection.AssemblyVersion("VERSION")]
            namespace Shared { public static class Info { public static string Text => "shared VERSION"; } }
            """;
        string PluginUsing(string name, string version)
        {
            var folder = temp.Combine(name);
            var lib = Compile("Shared.Lib", library.Replace("VERSION", version), Path.Combine(folder, "Shared.Lib.dll"));
            return Plugin(temp.Path, name, MethodSource(name.ToLowerInvariant(),
                "Shared.Info.Text + \" \" + typeof(Shared.Info).Assembly.GetName().Version"), lib);
        }
        var one = PluginUsing("One", "1.0.0.0");
        var two = PluginUsing("Two", "2.0.0.0");

        var registry = Load(one, two);

        Assert.Empty(registry.Broken);
        Assert.Equal("shared 1.0.0.0 1.0.0.0", registry.Get("one").Description);
        Assert.Equal("shared 2.0.0.0 2.0.0.0", registry.Get("two").Description);
        // The contract is shared: both methods implement the host's IAdapterMethod (the cast in the loader proves it too).
        Assert.All(registry.All, m => Assert.IsAssignableFrom<LoRAHub.Abstractions.IAdapterMethod>(m.Method));
    }

    [Fact]
    public void Folder_without_plugin_dll_is_reported_and_others_load()
    {
        var good = Plugin(temp.Path, "Good", MethodSource("good"));
        var empty = temp.Combine("Empty");
        temp.Write("Empty/readme.txt", "nothing built here");

        var registry = Load(empty, good);

        Assert.Contains("missing plugin assembly", BrokenOnly(registry, "Empty").Reason);
        Assert.Equal("good", Assert.Single(registry.All).Name);
    }

    [Fact]
    public void Bad_image_is_reported_and_others_load()
    {
        var good = Plugin(temp.Path, "Good", MethodSource("good"));
        temp.Write("Garbage/Garbage.dll", "this is not a PE file");

        var registry = Load(temp.Combine("Garbage"), good);

        Assert.Contains("not a .NET assembly", BrokenOnly(registry, "Garbage").Reason);
        Assert.Single(registry.All);
    }

    [Theory]
    [InlineData("1, 0", "major versions must match")]
    [InlineData("2, 99", "newer than this host's")]
    public void Wrong_contract_version_is_reported_and_others_load(string contract, string reason)
    {
        var good = Plugin(temp.Path, "Good", MethodSource("good"));
        var old = Plugin(temp.Path, "Other", MethodSource("other", contract: contract));

        var registry = Load(old, good);

        Assert.Contains(reason, BrokenOnly(registry, "Other").Reason);
        Assert.Equal("good", Assert.Single(registry.All).Name);
    }

    [Fact]
    public void Missing_plugin_attribute_is_reported()
    {
        var folder = temp.Combine("Plain");
        Compile("Plain", "public class Nothing {}", Path.Combine(folder, "Plain.dll"));

        var registry = Load(folder);

        Assert.Contains("lacks [assembly: AdapterPlugin", BrokenOnly(registry, "Plain").Reason);
    }

    [Fact]
    public void Throwing_constructor_is_reported_and_others_load()
    {
        var good = Plugin(temp.Path, "Good", MethodSource("good"));
        var bad = Plugin(temp.Path, "Thrower", MethodSource("thrower", constructorBody: "throw new InvalidOperationException(\"no GPU for you\");"));

        var registry = Load(bad, good);

        var reason = BrokenOnly(registry, "Thrower").Reason;
        Assert.Contains("constructor threw InvalidOperationException: no GPU for you", reason);
        Assert.Equal("good", Assert.Single(registry.All).Name);
    }

    [Fact]
    public void Duplicate_method_name_is_reported_and_the_first_wins()
    {
        var first = Plugin(temp.Path, "First", MethodSource("same"));
        var second = Plugin(temp.Path, "Second", MethodSource("SAME"));

        var registry = Load(first, second);

        Assert.Equal("First", Assert.Single(registry.All).PluginName);
        Assert.Contains("already provided by plugin First", BrokenOnly(registry, "Second").Reason);
    }

    [Fact]
    public void Missing_plugin_path_entry_is_reported()
    {
        var registry = Load(temp.Combine("does-not-exist"));

        Assert.Equal("folder not found", BrokenOnly(registry, "does-not-exist").Reason);
    }

    [Fact]
    public void Built_in_methods_are_listed_after_plugins_and_win_a_name_clash()
    {
        var alpha = Plugin(temp.Path, "Alpha", MethodSource("alpha"));
        var impostor = Plugin(temp.Path, "Impostor", MethodSource("FULL"));

        var registry = new PluginLoader { BuiltInMethods = [new LoRAHub.Training.FullFineTuning()] }.Load([alpha, impostor]);

        Assert.Equal(["alpha", "full"], registry.All.Select(m => m.Name));
        var full = registry.All[1];
        Assert.Equal((PluginLoader.BuiltInPluginName, "2.0"), (full.PluginName, full.ContractVersion));
        Assert.IsType<LoRAHub.Training.FullFineTuning>(registry.Get("Full"));
        Assert.Contains($"already provided by plugin {PluginLoader.BuiltInPluginName}", BrokenOnly(registry, "Impostor").Reason);
    }

    [Fact]
    public void Plugin_types_from_the_shared_assemblies_are_the_hosts()
    {
        // The plugin reports where TorchSharp, our extensions and the tuner kit came from; private copies dropped next to
        // it must not be used, or torch.Tensor, torchx and the kit's LoRA layer would be other types than the host's.
        Type[] shared = [typeof(TorchSharp.torch), typeof(LoRAHub.TorchExtensions.torchx), typeof(LoRAHub.Tuners.TunerLayer)];
        var folder = Plugin(temp.Path, "Probe", MethodSource("probe",
            "typeof(TorchSharp.torch.Tensor).Assembly.Location + \"|\" + typeof(LoRAHub.TorchExtensions.torchx).Assembly.Location + \"|\" + typeof(LoRAHub.Tuners.TunerLayer).Assembly.Location"),
            typeof(LoRAHub.TorchExtensions.torchx).Assembly.Location, typeof(LoRAHub.Tuners.TunerLayer).Assembly.Location);
        foreach (var type in shared) File.Copy(type.Assembly.Location, Path.Combine(folder, Path.GetFileName(type.Assembly.Location)));

        var registry = Load(folder);

        Assert.Empty(registry.Broken);
        Assert.Equal(string.Join("|", shared.Select(t => t.Assembly.Location)), registry.Get("probe").Description);
    }

    [Fact]
    public void Plugin_native_library_is_resolved_from_the_plugin_folder()
    {
        // Any shared library works as the plugin's private native code; zlib is on every Linux this runs on.
        var zlib = new[] { "/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib64/libz.so.1", "/usr/lib/libz.so.1" }
            .FirstOrDefault(File.Exists);
        Assert.True(zlib is not null, "no libz.so.1 found to stand in for a plugin's native library");
        var folder = Plugin(temp.Path, "Native", MethodSource("native", "System.Runtime.InteropServices.Marshal.PtrToStringAnsi(Zlib.zlibVersion())") + """

            static class Zlib
            {
                [System.Runtime.InteropServices.DllImport("libpluginzip.so")]
                public static extern System.IntPtr zlibVersion();
            }
            """);
        File.Copy(zlib, Path.Combine(folder, "libpluginzip.so"));

        var registry = Load(folder);

        Assert.Empty(registry.Broken);
        Assert.Matches(@"^1\.\d+", registry.Get("native").Description);
        Assert.Contains(Path.Combine(folder, "libpluginzip.so"), LoRAHub.TorchExtensions.LoadedLibraries.Find("libpluginzip.so"));
    }

    [Fact]
    public void A_saved_folder_loads_with_the_one_method_that_claims_it()
    {
        // Two methods of one format tell their folders apart by a telltale file, as DoRA's use_dora or QLoRA's own config.
        const string plain = "!System.IO.File.Exists(System.IO.Path.Combine(directory, \"variant.json\"))";
        const string variant = "System.IO.File.Exists(System.IO.Path.Combine(directory, \"variant.json\"))";
        var registry = Load(Plugin(temp.Path, "Plain", MethodSource("plain", claims: plain)),
            Plugin(temp.Path, "Variant", MethodSource("variant", claims: variant)),
            Plugin(temp.Path, "Other", MethodSource("other")));
        temp.Write("saved-plain/adapter_config.json", "{}");
        temp.Write("saved-variant/adapter_config.json", "{}");
        temp.Write("saved-variant/variant.json", "{}");

        Assert.Same(registry.Get("plain"), registry.ForFolder(temp.Combine("saved-plain")));
        Assert.Same(registry.Get("variant"), registry.ForFolder(temp.Combine("saved-variant")));
    }

    [Fact]
    public void A_folder_that_no_method_or_several_methods_claim_is_a_clear_error()
    {
        var registry = Load(Plugin(temp.Path, "One", MethodSource("one", claims: "true")),
            Plugin(temp.Path, "Two", MethodSource("two", claims: "System.IO.File.Exists(System.IO.Path.Combine(directory, \"x.json\"))")));
        temp.Write("ambiguous/x.json", "{}");
        Directory.CreateDirectory(temp.Combine("empty"));
        var noneClaims = Load(Plugin(temp.Combine("solo"), "Solo", MethodSource("solo")));

        var several = Assert.Throws<AdapterConfigurationException>(() => registry.ForFolder(temp.Combine("ambiguous")));
        Assert.Contains("several methods claim", several.Message);
        Assert.Contains("one (One), two (Two)", several.Message);
        var none = Assert.Throws<AdapterConfigurationException>(() => noneClaims.ForFolder(temp.Combine("empty")));
        Assert.Contains("no method claims", none.Message);
        Assert.Contains("methods: solo (Solo)", none.Message);
        Assert.Throws<DirectoryNotFoundException>(() => registry.ForFolder(temp.Combine("missing")));
    }
}
