
namespace LoRAHub.LoRA.Tests;

public class TargetModuleTests
{
    private static string[] Targets(TargetModuleSpec spec)
    {
        using var model = new TinyModel();
        using var adapter = Lora.Attach(model, Lora.Options(targets: spec));
        return adapter.Layers.Keys.Order().ToArray();
    }

    [Fact]
    public void A_list_matches_exact_paths_and_dotted_suffixes()
    {
        Assert.Equal(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"], Targets(new[] { "q_proj" }));
        Assert.Equal(["model.layers.1.self_attn.o_proj"], Targets(new[] { "layers.1.self_attn.o_proj" }));
        Assert.Equal(["lm_head"], Targets(new[] { "lm_head" }));
        // "proj" is neither a path nor a dotted suffix of "q_proj".
        Assert.Throws<AdapterConfigurationException>(() => Targets(new[] { "proj" }));
    }

    [Fact]
    public void A_string_is_a_regex_matched_against_the_whole_path()
    {
        Assert.Equal(["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"], Targets(@"model\.layers\.1\.self_attn\.(q|v)_proj"));
        Assert.Throws<AdapterConfigurationException>(() => Targets("q_proj")); // partial match is not enough
    }

    [Fact]
    public void All_linear_takes_every_linear_but_the_output_head()
    {
        var paths = Targets("all-linear");
        Assert.Equal(6, paths.Length);
        Assert.DoesNotContain("lm_head", paths);
        using var model = new TinyModel();
        using var adapter = Lora.Attach(model, Lora.Options(targets: "all-linear"));
        Assert.IsType<Linear>(model.get_submodule("lm_head"));
        // PEFT records the expanded names in adapter_config.json.
        Assert.Equal(["o_proj", "q_proj", "v_proj"], SavedTargets(adapter));
    }

    private static string[] SavedTargets(LoraAdapter adapter)
    {
        var dir = Lora.TempDir();
        adapter.Save(dir);
        using var doc = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")));
        return doc.RootElement.GetProperty("target_modules").EnumerateArray().Select(e => e.GetString()!).ToArray();
    }

    [Fact]
    public void Exclude_modules_and_modules_to_save_are_never_targeted()
    {
        using var model = new TinyModel();
        var options = Lora.Options(targets: "all-linear");
        options.ExcludeModules = new[] { "o_proj" };
        options.ModulesToSave = ["lm_head"];
        using var adapter = Lora.Attach(model, options);
        Assert.Equal(4, adapter.Layers.Count);
        Assert.DoesNotContain(adapter.Layers.Keys, k => k.EndsWith("o_proj"));
    }

    [Fact]
    public void Targets_that_match_nothing_name_the_option_and_list_real_modules()
    {
        using var model = new TinyModel();
        var e = Assert.Throws<AdapterConfigurationException>(() => Lora.Attach(model, Lora.Options(targets: new[] { "query" })));
        Assert.Contains("target_modules", e.Message);
        Assert.Contains("q_proj", e.Message);
        Assert.Contains("model.layers.0.self_attn.q_proj", e.Message);
        // Nothing was changed by the failed attach.
        Assert.IsType<Linear>(model.get_submodule("model.layers.0.self_attn.q_proj"));
        Assert.All(model.parameters(), p => Assert.False(p.requires_grad));
    }

    [Fact]
    public void Targeting_a_non_linear_module_is_an_error()
    {
        using var model = new TinyModel();
        var e = Assert.Throws<AdapterConfigurationException>(() => Lora.Attach(model, Lora.Options(targets: new[] { "self_attn" })));
        Assert.Contains("Linear", e.Message);
        Assert.Contains("model.layers.0.self_attn", e.Message);
    }

    [Fact]
    public void Bad_options_name_the_option()
    {
        void Expect(string option, Action<LoraOptions> change)
        {
            using var model = new TinyModel();
            var o = Lora.Options();
            change(o);
            var e = Assert.Throws<AdapterConfigurationException>(() => Lora.Attach(model, o));
            Assert.Contains($"'{option}'", e.Message);
        }
        Expect("r", o => o.R = 0);
        Expect("lora_dropout", o => o.LoraDropout = 1.5);
        Expect("bias", o => o.Bias = "some");
        Expect("loraplus_lr_ratio", o => o.LoraplusLrRatio = -1);
        Expect("rank_pattern", o => o.RankPattern = new() { ["q_proj"] = 0 });
        Expect("modules_to_save", o => o.ModulesToSave = ["no_such_head"]);
    }

    [Fact]
    public void Options_bind_from_script_objects_and_json_with_peft_names()
    {
        using var model = new TinyModel();
        using var adapter = (LoraAdapter)new LoraMethod().Attach(model,
            new { r = 2, lora_alpha = 16, target_modules = new[] { "v_proj" }, init_lora_weights = "gaussian", use_rslora = true });
        var v = adapter.Layers["model.layers.0.self_attn.v_proj"];
        Assert.Equal(2, v.Rank("default"));
        Assert.Equal(16 / Math.Sqrt(2), v.Scaling("default"), 12);
        Assert.Equal(LoraInit.Gaussian, adapter.OptionsOf("default").InitLoraWeights);

        var json = OptionsBinder.Bind<LoraOptions>("""{"r": 4, "target_modules": "model\\.layers\\.0\\..*_proj", "rank_pattern": {"o_proj": 1}}""");
        Assert.Equal(@"model\.layers\.0\..*_proj", json.TargetModules!.Pattern);
        Assert.Equal(1, json.RankPattern["o_proj"]);
        Assert.Throws<AdapterConfigurationException>(() => OptionsBinder.Bind<LoraOptions>(new { rank = 4 }));
    }
}
