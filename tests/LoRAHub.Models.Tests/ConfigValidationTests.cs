using System.Text.Json.Nodes;
using LoRAHub.Models.Llama;

namespace LoRAHub.Models.Tests;

/// <summary>Bad config.json values (issue 21): each is refused before anything is built, naming the file and the field.</summary>
public sealed class ConfigValidationTests
{
    private const string Source = "/models/tiny/config.json";

    private static JsonObject Valid() => JsonNode.Parse(TinyModels.LlamaConfig().ToJson())!.AsObject();

    [Theory]
    [InlineData("num_key_value_heads", "0")]
    [InlineData("num_key_value_heads", "-1")]
    [InlineData("num_key_value_heads", "3")] // does not divide num_attention_heads
    [InlineData("num_attention_heads", "5")] // does not divide hidden_size
    [InlineData("head_dim", "0")]
    [InlineData("max_position_embeddings", "0")]
    [InlineData("max_position_embeddings", "-1")]
    [InlineData("rms_norm_eps", "-1")]
    [InlineData("rope_theta", "0")]
    [InlineData("rope_theta", "-10000")]
    [InlineData("vocab_size", "0")]
    [InlineData("intermediate_size", "-5")]
    [InlineData("torch_dtype", "\"float7\"")]
    [InlineData("eos_token_id", "\"x\"")]
    [InlineData("eos_token_id", "{}")]
    [InlineData("eos_token_id", "[2, \"x\"]")]
    [InlineData("rope_scaling", "{\"rope_type\": \"linear\", \"factor\": 0}")]
    [InlineData("rope_scaling", "5")]
    [InlineData("vocab_size", "\"32\"")]
    [InlineData("num_hidden_layers", "2.5")]
    [InlineData("rope_parameters", "{\"rope_type\": \"default\", \"rope_theta\": \"big\"}")]
    public void A_bad_value_names_the_file_and_the_field(string field, string value)
    {
        var config = Valid();
        config[field] = JsonNode.Parse(value);
        var e = Assert.Throws<InvalidDataException>(() => LlamaConfig.FromJson(config.ToJsonString(), Source));
        Assert.StartsWith(Source + ": ", e.Message);
        Assert.Contains(field, e.Message);
    }

    [Theory]
    [InlineData("eos_token_id", "[2, 7]")]
    [InlineData("eos_token_id", "null")]
    [InlineData("torch_dtype", "\"bfloat16\"")]
    [InlineData("torch_dtype", "\"torch.float16\"")]
    [InlineData("rms_norm_eps", "1e-5")]
    [InlineData("pad_token_id", "-1")] // early Llama conversions wrote this
    public void Valid_values_load(string field, string value)
    {
        var config = Valid();
        config[field] = JsonNode.Parse(value);
        LlamaConfig.FromJson(config.ToJsonString(), Source);
    }

    [Theory]
    [InlineData("[]", "array")]
    [InlineData("null", "null")]
    [InlineData("\"llama\"", "string")]
    [InlineData("{\"model_type\": 5}", "'model_type'")]
    [InlineData("{\"model_type\": [\"llama\"]}", "'model_type'")]
    [InlineData("{\"model_type\": true}", "'model_type'")]
    [InlineData("{\"model_type\": \"llama\", \"quantization_config\": {\"load_in_4bit\": \"yes\"}}", "'quantization_config'")]
    public void A_config_that_is_not_an_object_or_lacks_a_string_model_type_names_the_file(string text, string expected)
    {
        var folder = TinyModels.TempFolder();
        var path = Path.Combine(folder, "config.json");
        File.WriteAllText(path, text);
        var e = Assert.ThrowsAny<Exception>(() => PretrainedModel.Load(folder).Dispose());
        Assert.True(e is InvalidDataException or NotSupportedException, e.ToString());
        Assert.Contains(path, e.Message);
        Assert.Contains(expected, e.Message);
        Assert.Equal(text, File.ReadAllText(path));
    }
}
