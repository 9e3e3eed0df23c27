using System.Text.Json;

namespace LoRAHub.Tuners.Tests;

/// <summary>An options class's [ConfigKey] properties are its one list of config fields: read, write and copy come from it.</summary>
public class ConfigFieldsTests
{
    [Fact]
    public void Lora_fields_are_every_key_of_the_config_written_once_in_base_class_order()
    {
        var keys = ConfigFields.Of(typeof(LoraOptions)).Select(f => f.Key).ToList();
        Assert.Equal(keys.Distinct(), keys);
        Assert.Equal(["target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"], keys.Take(4));
        Assert.Contains("lora_alpha", keys);
        Assert.DoesNotContain(keys, k => k.StartsWith("loraplus")); // training settings are options, not saved fields
        Assert.Empty(ConfigFields.DeclaredOn(typeof(TargetOptions)).Select(f => f.Key).Except(keys));
    }

    [Fact]
    public void Peft_spellings_of_one_or_many_read_into_lists_and_bad_values_name_file_and_key()
    {
        using var doc = JsonDocument.Parse("""{"r": 4, "layers_to_transform": 1, "layers_pattern": "layers", "target_modules": ["q_proj"], "bias": null}""");
        var options = new LoraOptions();
        ConfigFields.ReadFrom(doc.RootElement, options, ConfigFields.Of(typeof(LoraOptions)), "a.json");
        Assert.Equal(4, options.R);
        Assert.Equal([1], options.LayersToTransform!);
        Assert.Equal(["layers"], options.LayersPattern!);
        Assert.Equal("none", options.Bias); // null keeps the default

        using var bad = JsonDocument.Parse("""{"r": "four"}""");
        var e = Assert.Throws<AdapterConfigurationException>(() => ConfigFields.ReadFrom(bad.RootElement, new LoraOptions(), ConfigFields.Of(typeof(LoraOptions)), "a.json"));
        Assert.Contains("a.json", e.Message);
        Assert.Contains("'r'", e.Message);
    }

    [Fact]
    public void Written_configs_read_back_to_equal_options()
    {
        var options = new LoraOptions
        {
            R = 3, LoraAlpha = 6.5, TargetModules = new[] { "v_proj", "q_proj" }, LayersToTransform = [0, 1], LayersPattern = ["layers"],
            RankPattern = new() { ["q_proj"] = 2 }, AlphaPattern = new() { ["v_proj"] = 1.5 }, ModulesToSave = ["lm_head"], UseRslora = true,
            InitLoraWeights = LoraInit.Gaussian, Bias = "lora_only",
        };
        var dir = Folders.Temp();
        var path = Path.Combine(dir, LoraConfigFile.FileName);
        LoraConfigFile.Write(path, options, options.TargetModules!, "base");
        var back = LoraConfigFile.Read(path, []);
        foreach (var field in ConfigFields.Of(typeof(LoraOptions)))
            Assert.Equal(JsonSerializer.Serialize(field.Property.GetValue(field.Key == "target_modules" ? Sorted(options) : options), ConfigFields.Json),
                JsonSerializer.Serialize(field.Property.GetValue(back), ConfigFields.Json));
        Assert.DoesNotContain(Directory.GetFiles(dir), f => f.Contains(".tmp")); // written atomically: no temp file left
        Directory.Delete(dir, recursive: true);
    }

    private static LoraOptions Sorted(LoraOptions o) // the file records target names sorted, as PEFT's set does
    {
        var copy = o.Clone();
        copy.TargetModules = TargetModuleSpec.FromNames(o.TargetModules!.Names!.Order(StringComparer.Ordinal));
        return copy;
    }

    [Fact]
    public void Copies_share_no_collection_and_carry_options_that_are_not_saved()
    {
        var options = new LoraOptions { RankPattern = new() { ["q_proj"] = 2 }, ModulesToSave = ["lm_head"], LayersToTransform = [1], LoraplusLrRatio = 16 };
        var clone = options.Clone();
        var copy = new LoraOptions();
        copy.CopyLoraSettingsFrom(options);
        foreach (var other in new[] { clone, copy })
        {
            Assert.Equal(16, other.LoraplusLrRatio);
            Assert.Equal(2, other.RankPattern["q_proj"]);
            Assert.NotSame(options.RankPattern, other.RankPattern);
            Assert.NotSame(options.ModulesToSave, other.ModulesToSave);
            Assert.NotSame(options.LayersToTransform, other.LayersToTransform);
        }
    }
}
