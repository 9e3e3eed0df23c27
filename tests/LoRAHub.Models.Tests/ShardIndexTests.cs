using LoRAHub.Safetensors;

namespace LoRAHub.Models.Tests;

/// <summary>A damaged or hostile model.safetensors.index.json is refused naming the index by both loaders, Load and LoadIn4bit.</summary>
public sealed class ShardIndexTests
{
    [Theory]
    [InlineData("{\"weight_map\": {\"lm_head.weight\": \"../../etc/passwd\"}}", "not the name of a file")]
    [InlineData("{\"weight_map\": {\"lm_head.weight\": \"model-00001-of-00002.safetensors\"}}", "does not exist")]
    [InlineData("[]", "weight_map")]
    [InlineData("{\"weight_map\": ", "not valid JSON")]
    public void A_bad_index_is_a_named_error_for_both_loaders(string index, string expected)
    {
        var folder = TinyModels.TempFolder();
        File.WriteAllText(Path.Combine(folder, "config.json"), TinyModels.LlamaConfig().ToJson());
        var indexPath = Path.Combine(folder, ShardedSafetensors.IndexFileName);
        File.WriteAllText(indexPath, index);
        foreach (var load in new Func<ICausalLanguageModel>[] { () => PretrainedModel.Load(folder), () => PretrainedModel.LoadIn4bit(folder) })
        {
            var e = Assert.Throws<SafetensorsFormatException>(() => load().Dispose());
            Assert.Contains(indexPath, e.Message);
            Assert.Contains(expected, e.Message);
        }
        Assert.Equal(index, File.ReadAllText(indexPath));
    }
}
