using LoRAHub.Plugins.AdaLoRA;
using LoRAHub.Plugins.DoRA;
using LoRAHub.Plugins.LoRA;
using LoRAHub.Plugins.LongLoRA;
using LoRAHub.Plugins.QLoRA;
using LoRAHub.Training;

namespace LoRAHub.Tuners.Tests;

/// <summary>
/// A saved folder loads without naming its method: each method claims its own folders, and exactly one must claim a
/// folder. LoRA, DoRA, QLoRA and LongLoRA all write peft_type LORA; the telltales tell them apart.
/// </summary>
public class FolderClaimTests
{
    private static readonly IAdapterMethod[] Methods =
        [new LoraMethod(), new DoraMethod(), new QLoraMethod(), new LongLoraMethod(), new AdaLoraMethod(), new FullFineTuning()];

    private static string Saved(string method)
    {
        var dir = Folders.Temp();
        using var model = new TinyModel(hidden: 64); // whole 4-bit blocks for QLoRA
        IAdapterMethod m = Methods.Single(x => x.Name == method);
        object options = method switch
        {
            "qlora" => new QLoraOptions { R = 2, Bnb4bitComputeDtype = "float32", Device = "cpu", TargetModules = new[] { "q_proj" } },
            "adalora" => new { total_step = 10, init_r = 4, target_r = 2, target_modules = new[] { "q_proj" } },
            "full" => new FullFineTuningOptions(),
            "longlora" => new { r = 2, target_modules = new[] { "q_proj", "v_proj" }, modules_to_save = new[] { "embed_tokens" } },
            _ => new { r = 2, target_modules = new[] { "q_proj", "v_proj" } },
        };
        using var adapter = m.Attach(model, options);
        adapter.Save(dir);
        return dir;
    }

    [Theory]
    [InlineData("lora")]
    [InlineData("dora")]
    [InlineData("qlora")]
    [InlineData("longlora")]
    [InlineData("adalora")]
    [InlineData("full")]
    public void Exactly_the_method_that_saved_a_folder_claims_it(string method)
    {
        var dir = Saved(method);
        Assert.Equal([method], Methods.Where(m => m.Claims(dir)).Select(m => m.Name));
        Assert.Equal(method, AdapterFolder.Claimant(Methods, dir).Name);
        Directory.Delete(dir, recursive: true);
    }

    [Fact]
    public void A_folder_loads_without_naming_its_method()
    {
        var dir = Saved("dora");
        using var model = new TinyModel(hidden: 64);
        using var adapter = AdapterFolder.Load(Methods, model, dir);
        Assert.Equal("dora", adapter.Method.Name);
        Assert.IsType<LoraAdapter>(adapter);
        Directory.Delete(dir, recursive: true);
    }

    [Fact]
    public void A_folder_no_method_claims_is_an_error_naming_the_methods_and_the_files()
    {
        var dir = Saved("lora");
        // A DoRA adapter quantized QLoRA-style (QDoRA): LoRAHub has no method for it.
        var config = Path.Combine(dir, "adapter_config.json");
        File.WriteAllText(config, File.ReadAllText(config).Replace("\"use_dora\": false", "\"use_dora\": true"));
        File.WriteAllText(Path.Combine(dir, "qlora_config.json"), "{}");

        var e = Assert.Throws<AdapterConfigurationException>(() => AdapterFolder.Claimant(Methods, dir));
        Assert.Contains("no method claims", e.Message);
        Assert.Contains("lora, dora, qlora, longlora, adalora, full", e.Message);
        Assert.Contains("qlora_config.json", e.Message);
        Assert.Contains("peft_type LORA", e.Message);
        Assert.Throws<AdapterConfigurationException>(() => AdapterFolder.Claimant(Methods, Folders.Temp()));
        Directory.Delete(dir, recursive: true);
    }

    [Fact]
    public void A_folder_without_a_readable_adapter_config_is_an_error_saying_what_is_wrong_with_it()
    {
        var dir = Saved("lora");
        var config = Path.Combine(dir, "adapter_config.json");
        string Error() => Assert.Throws<AdapterConfigurationException>(() => AdapterFolder.Claimant(Methods, dir)).Message;

        var text = File.ReadAllText(config);
        File.WriteAllText(config, text[..(text.Length / 2)]);
        Assert.Contains($"{config} is not valid JSON", Error());
        File.WriteAllText(config, text.Replace("\"peft_type\"", "\"kind\""));
        Assert.Contains($"{config} has no peft_type", Error());
        File.WriteAllText(config, "[1, 2]");
        Assert.Contains($"{config} is not a JSON object", Error());

        // A run's folder holds its adapter one level down; a model folder is no adapter at all.
        var run = Folders.Temp();
        Directory.Move(dir, Path.Combine(run, "adapter"));
        File.WriteAllText(Path.Combine(run, "adapter", "adapter_config.json"), text);
        Assert.Contains($"{run} has no adapter_config.json, but {Path.Combine(run, "adapter")} has: pass that folder",
            Assert.Throws<AdapterConfigurationException>(() => AdapterFolder.Claimant(Methods, run)).Message);
        var model = Folders.Temp();
        File.WriteAllText(Path.Combine(model, "config.json"), "{}");
        Assert.StartsWith($"{model} is a model folder (config.json), not an adapter (adapter_config.json)",
            Assert.Throws<ArgumentException>(() => AdapterFolder.Claimant(Methods, model)).Message);
        Directory.Delete(run, recursive: true);
        Directory.Delete(model, recursive: true);
    }

    [Fact]
    public void Two_claimants_are_an_error_naming_both()
    {
        var dir = Saved("lora");
        var e = Assert.Throws<AdapterConfigurationException>(() => AdapterFolder.Claimant([.. Methods, new GreedyMethod()], dir));
        Assert.Contains("several methods claim", e.Message);
        Assert.Contains("lora, greedy", e.Message);
        Directory.Delete(dir, recursive: true);
    }

    [Fact]
    public void A_method_that_claims_nothing_is_never_chosen()
    {
        var dir = Saved("longlora");
        Assert.Equal("longlora", AdapterFolder.Claimant([.. Methods, new SilentMethod()], dir).Name);
        Directory.Delete(dir, recursive: true);
    }

    // An outside method that claims every folder (a badly written plugin).
    private sealed class GreedyMethod : AdapterMethod<GreedyOptions>
    {
        public override string Name => "greedy";
        public override string Description => "claims everything";
        public override IAdapter Attach(IAdaptableModel model, GreedyOptions options) => throw new NotSupportedException();
        public override IAdapter Load(IAdaptableModel model, string directory) => throw new NotSupportedException();
        public override bool Claims(string directory) => true;
    }

    private sealed class GreedyOptions;

    // An outside method written against the contract without Claims: the default claims nothing.
    private sealed class SilentMethod : IAdapterMethod
    {
        public string Name => "silent";
        public string Description => "claims nothing";
        public Type OptionsType => typeof(object);
        public object CreateDefaultOptions() => new();
        public IAdapter Attach(IAdaptableModel model, object options) => throw new NotSupportedException();
        public IAdapter Load(IAdaptableModel model, string directory) => throw new NotSupportedException();
    }
}
