using LoRAHub.Models;
using LoRAHub.Plugins.DoRA;
using LoRAHub.Plugins.LoRA;

namespace LoRAHub.Conformance.Tests;

/// <summary>
/// The options of scripts/peft/interop_matrix.py, as PEFT's LoraConfig keyword JSON, bind and attach on each fixture
/// family, save, and load back with the same logits (the GPU-side matrix then compares with PEFT itself).
/// </summary>
public class PeftOptionsTests
{
    private static string FixtureDir(string family) => Path.Combine(Path.GetDirectoryName(Fixture.LlamaDir)!, family);

    public static TheoryData<string, string, string> Cases()
    {
        var data = new TheoryData<string, string, string>();
        foreach (var (family, targets, layers, saved, patterns) in new[]
                 {
                     ("llama", "[\"q_proj\", \"v_proj\", \"down_proj\"]", "layers", "lm_head", "\"rank_pattern\": {\"v_proj\": 2}, \"alpha_pattern\": {\"down_proj\": 3}"),
                     ("qwen2", "[\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]", "layers", "lm_head",
                         "\"rank_pattern\": {\"layers\\\\.1\\\\.self_attn\\\\.q_proj\": 2}, \"alpha_pattern\": {\"k_proj\": 16}"),
                     ("gpt2", "[\"c_attn\", \"c_proj\", \"c_fc\"]", "h", "ln_f", "\"rank_pattern\": {\"c_fc\": 2}, \"alpha_pattern\": {\"h\\\\.0\\\\.attn\\\\.c_proj\": 2}"),
                 })
        {
            var common = $"\"r\": 4, \"lora_alpha\": 8, \"target_modules\": {targets}, \"init_lora_weights\": false";
            foreach (var method in new[] { "lora", "dora" })
            {
                data.Add(family, method, $"{{{common}, {patterns}, \"use_rslora\": true, \"layers_to_transform\": [1], \"layers_pattern\": \"{layers}\"}}");
                data.Add(family, method, $"{{{common}, \"bias\": \"lora_only\", \"modules_to_save\": [\"{saved}\"]}}");
                data.Add(family, method, $"{{{common}, \"bias\": \"all\", \"init_lora_weights\": \"pissa\"}}");
            }
            if (family != "llama") data.Add(family, "lora", $"{{{common}, \"lora_bias\": true, \"init_lora_weights\": \"orthogonal\"}}");
            data.Add(family, "lora", $"{{{common}, \"trainable_token_indices\": [1, 5, 9, 40]}}");
        }
        // The matrix's untied-only and LoftQ cases (LoftQ is redone on load: the base is NF4(W) again).
        var llama = "\"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"q_proj\", \"v_proj\", \"down_proj\"]";
        data.Add("llama", "lora", $"{{{llama}, \"init_lora_weights\": false, \"trainable_token_indices\": {{\"embed_tokens\": [1, 5], \"lm_head\": [9, 33]}}}}");
        foreach (var family in new[] { "llama", "llama_tied" })
        {
            data.Add(family, "lora", $"{{{llama}, \"init_lora_weights\": \"loftq\", \"loftq_config\": {{\"loftq_bits\": 4, \"loftq_iter\": 1}}}}");
        }
        return data;
    }

    [Theory, MemberData(nameof(Cases))]
    public void Peft_keyword_options_attach_save_and_load_back(string family, string method, string json)
    {
        IAdapterMethod m = method == "dora" ? new DoraMethod() : new LoraMethod();
        var ids = Fixture.Ids(batch: 1, length: 12);
        using var model = PretrainedModel.Load(FixtureDir(family));
        var before = Fixture.Logits(model, ids);
        using var adapter = m.Attach(model, json);
        Fixture.Perturb(adapter);
        var adapted = Fixture.Logits(model, ids);
        Assert.True((adapted - before).abs().max().item<float>() > 1e-3);
        var dir = Fixture.Temp();
        adapter.Save(dir);
        using var fresh = PretrainedModel.Load(FixtureDir(family));
        using var loaded = AdapterFolder.Claimant([new LoraMethod(), new DoraMethod()], dir).Load(fresh, dir);
        Fixture.Close(adapted, Fixture.Logits(fresh, ids), 1e-5, $"{family} {method} {json}");
    }
}
