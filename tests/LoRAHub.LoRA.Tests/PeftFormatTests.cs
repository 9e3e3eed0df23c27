using System.Runtime.InteropServices;
using System.Text.Json;
using LoRAHub.Safetensors;
using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.LoRA.Tests;

public class PeftFormatTests
{
    private static JsonElement ReadConfig(string dir) =>
        JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json"))).RootElement;

    [Fact]
    public void Adapter_config_has_peft_keys_and_values()
    {
        using var model = new TinyModel();
        var options = Lora.Options(r: 4, alpha: 16);
        options.LoraDropout = 0.05;
        options.UseRslora = true;
        options.ModulesToSave = ["lm_head"];
        options.RankPattern = new() { ["v_proj"] = 2 };
        using var adapter = Lora.Attach(model, options);
        var dir = Lora.TempDir();
        adapter.Save(dir);
        var c = ReadConfig(dir);

        Assert.Equal("LORA", c.GetProperty("peft_type").GetString());
        Assert.Equal("CAUSAL_LM", c.GetProperty("task_type").GetString());
        Assert.Equal(4, c.GetProperty("r").GetInt32());
        Assert.Equal(16, c.GetProperty("lora_alpha").GetInt32()); // written as an integer, like PEFT's int
        Assert.Equal(0.05, c.GetProperty("lora_dropout").GetDouble());
        Assert.Equal(["q_proj", "v_proj"], c.GetProperty("target_modules").EnumerateArray().Select(e => e.GetString()));
        Assert.Equal("none", c.GetProperty("bias").GetString());
        Assert.True(c.GetProperty("use_rslora").GetBoolean());
        Assert.False(c.GetProperty("use_dora").GetBoolean());
        Assert.True(c.GetProperty("init_lora_weights").GetBoolean());
        Assert.Equal(["lm_head"], c.GetProperty("modules_to_save").EnumerateArray().Select(e => e.GetString()));
        Assert.Equal(2, c.GetProperty("rank_pattern").GetProperty("v_proj").GetInt32());
        Assert.Equal(JsonValueKind.Object, c.GetProperty("alpha_pattern").ValueKind);
        Assert.False(c.GetProperty("fan_in_fan_out").GetBoolean());
        Assert.Equal("tests/tiny-model", c.GetProperty("base_model_name_or_path").GetString());
        Assert.True(c.GetProperty("inference_mode").GetBoolean());
        Assert.Equal(JsonValueKind.Null, c.GetProperty("revision").ValueKind);
        Assert.Equal(JsonValueKind.Null, c.GetProperty("layers_to_transform").ValueKind);
        Assert.False(c.GetProperty("lora_bias").GetBoolean());
        var keys = c.EnumerateObject().Select(p => p.Name).ToList();
        Assert.Equal(keys.Order(StringComparer.Ordinal), keys); // PEFT writes sort_keys=True
    }

    [Fact]
    public void Saved_safetensors_keys_are_exactly_peft_names()
    {
        using var model = new TinyModel();
        var options = Lora.Options(r: 4, targets: new[] { "q_proj" });
        options.ModulesToSave = ["lm_head"];
        using var adapter = Lora.Attach(model, options);
        var dir = Lora.TempDir();
        adapter.Save(dir);
        using var file = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
        var tensors = file.Tensors.ToDictionary(t => t.Name);
        Assert.Equal(
            [
                "base_model.model.lm_head.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
            ],
            tensors.Keys.Order(StringComparer.Ordinal));
        Assert.All(tensors.Values, t => Assert.Equal(SafetensorsDType.F32, t.DType));
        Assert.Equal([4L, TinyModel.DefaultHidden], tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].Shape);
        Assert.Equal([(long)TinyModel.DefaultHidden, 4L], tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].Shape);
    }

    [Fact]
    public void Save_then_load_reproduces_outputs_exactly()
    {
        var x = TinyModel.Batch();
        var dir = Lora.TempDir();
        Tensor expected;
        using (var model = new TinyModel())
        {
            var options = Lora.Options(init: LoraInit.Random, targets: "all-linear");
            options.ModulesToSave = ["lm_head"];
            using var adapter = Lora.Attach(model, options);
            using var optimizer = new AdamW(adapter.ParameterGroups(0.05, 0));
            for (var i = 0; i < 3; i++)
            {
                using var scope = torch.NewDisposeScope();
                optimizer.zero_grad();
                model.Loss(x, TinyModel.Batch(seed: 2)).backward();
                optimizer.step();
            }
            expected = model.Forward(x);
            adapter.Save(dir);
        }
        using var fresh = new TinyModel();
        var baseline = fresh.Forward(x);
        using var loaded = (LoraAdapter)new LoraMethod().Load(fresh, dir);
        Assert.True(fresh.Forward(x).Equals(expected));
        loaded.Enabled = false;
        Assert.True(fresh.Forward(x).Equals(baseline)); // includes the original lm_head
    }

    [Fact]
    public void A_hand_written_peft_adapter_gives_Wx_plus_sBAx()
    {
        const int r = 2, d = TinyModel.DefaultHidden;
        var a = Enumerable.Range(0, r * d).Select(i => (float)Math.Sin(i + 1) * 0.3f).ToArray();   // A: r×in
        var b = Enumerable.Range(0, d * r).Select(i => (float)Math.Cos(i * 0.7) * 0.2f).ToArray(); // B: out×r
        var dir = Lora.TempDir();
        const string prefix = "base_model.model.model.layers.0.self_attn.q_proj.";
        SafetensorsWriter.Write(Path.Combine(dir, "adapter_model.safetensors"),
        [
            Entry(prefix + "lora_A.weight", [r, d], a),
            Entry(prefix + "lora_B.weight", [d, r], b),
        ], new Dictionary<string, string> { ["format"] = "pt" });
        // As PEFT 0.x writes it, with fields LoRAHub does not use.
        File.WriteAllText(Path.Combine(dir, "adapter_config.json"), """
            {
              "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "somewhere/tiny", "bias": "none",
              "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true, "layers_pattern": null,
              "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 16, "lora_dropout": 0.1,
              "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null, "peft_type": "LORA",
              "peft_version": "0.13.2", "r": 2, "rank_pattern": {}, "revision": null,
              "target_modules": "model\\.layers\\.0\\.self_attn\\.q_proj", "task_type": "CAUSAL_LM",
              "use_dora": false, "use_rslora": false
            }
            """);

        using var model = new TinyModel();
        using var adapter = (LoraAdapter)new LoraMethod().Load(model, dir);
        model.eval(); // dropout off
        var layer = adapter.Layers.Single().Value;
        var w = ((Linear)layer.base_layer).weight.data<float>().ToArray(); // out×in
        var x = Enumerable.Range(0, d).Select(i => (float)(i - 3) * 0.25f).ToArray();
        const double s = 16.0 / r;
        var expected = new float[d];
        for (var o = 0; o < d; o++)
        {
            double wx = 0, bax = 0;
            for (var i = 0; i < d; i++) wx += w[o * d + i] * x[i];
            for (var k = 0; k < r; k++)
            {
                double ax = 0;
                for (var i = 0; i < d; i++) ax += a[k * d + i] * x[i];
                bax += b[o * r + k] * ax;
            }
            expected[o] = (float)(wx + s * bax);
        }
        var y = layer.forward(torch.tensor(x, [1, d]));
        Assert.True(y.allclose(torch.tensor(expected, [1, d]), 1e-5, 1e-5), y.str());
    }

    private static SafetensorsEntry Entry(string name, long[] shape, float[] data)
    {
        var bytes = MemoryMarshal.AsBytes(data.AsSpan()).ToArray();
        return new SafetensorsEntry(name, SafetensorsDType.F32, shape, bytes.Length, s => s.Write(bytes));
    }

    [Fact]
    public void Loading_checks_keys_and_shapes_and_changes_nothing_on_error()
    {
        var dir = Lora.TempDir();
        using (var model = new TinyModel())
        using (var adapter = Lora.Attach(model, Lora.Options(r: 4)))
            adapter.Save(dir);
        var weights = Path.Combine(dir, "adapter_model.safetensors");

        // The config now says r=2 while the file holds rank 4.
        var config = Path.Combine(dir, "adapter_config.json");
        File.WriteAllText(config, File.ReadAllText(config).Replace("\"r\": 4", "\"r\": 2"));
        using (var model = new TinyModel())
        {
            var e = Assert.Throws<InvalidDataException>(() => new LoraMethod().Load(model, dir));
            Assert.Contains("lora_A.weight", e.Message);
            Assert.Contains("[4, 8]", e.Message);
            Assert.Contains("[2, 8]", e.Message);
            Assert.Contains("rank 4 where adapter_config.json gives this module r = 2", e.Message);
            Assert.IsType<Linear>(model.get_submodule("model.layers.0.self_attn.q_proj"));
        }

        // The adapter of a model with other layer sizes.
        File.WriteAllText(config, File.ReadAllText(config).Replace("\"r\": 2", "\"r\": 4"));
        using (var model = new TinyModel(hidden: 16))
        {
            var e = Assert.Throws<InvalidDataException>(() => new LoraMethod().Load(model, dir));
            Assert.Contains("features in this base model", e.Message);
            File.WriteAllText(config, File.ReadAllText(config).Replace("\"r\": 4", "\"r\": 2"));
        }

        // A key for a module the config does not target.
        File.WriteAllText(config, File.ReadAllText(config).Replace("\"r\": 2", "\"r\": 4").Replace("\"v_proj\"", "\"o_proj\""));
        using (var model = new TinyModel())
        {
            var e = Assert.Throws<InvalidDataException>(() => new LoraMethod().Load(model, dir));
            Assert.Contains("v_proj.lora_", e.Message);
            Assert.Contains("does not map", e.Message);
        }
        Assert.True(File.Exists(weights));
    }

    [Fact]
    public void Load_adapter_hot_swaps_in_place_without_touching_the_base()
    {
        var x = TinyModel.Batch();
        var first = Lora.TempDir();
        var second = Lora.TempDir();
        Tensor secondOutput;
        using (var model = new TinyModel())
        using (var adapter = Lora.Attach(model, Lora.Options(init: LoraInit.Random)))
            adapter.Save(first);
        using (var model = new TinyModel())
        {
            torchx.manual_seed(42);
            var options = Lora.Options(alpha: 32, init: LoraInit.Random);
            using var adapter = Lora.Attach(model, options);
            adapter.Save(second);
            secondOutput = model.Forward(x);
        }

        using var served = new TinyModel();
        var baseTensors = served.named_parameters().ToList();
        var baseValues = Lora.Snapshot(served);
        using var lora = (LoraAdapter)new LoraMethod().Load(served, first);
        var a = lora.Layers["model.layers.0.self_attn.q_proj"].A("default");
        var firstOutput = served.Forward(x);
        lora.LoadAdapter(second, "default");
        Assert.Same(a, lora.Layers["model.layers.0.self_attn.q_proj"].A("default"));
        Assert.Equal(8.0, lora.Layers["model.layers.0.self_attn.q_proj"].Scaling("default")); // alpha 32 / r 4
        Assert.True(served.Forward(x).Equals(secondOutput));
        Assert.False(firstOutput.allclose(secondOutput, 1e-3, 1e-3));
        foreach (var (name, t) in baseTensors)
            Assert.True(t.Equals(baseValues[name]), name);

        // A second name loads beside it.
        lora.LoadAdapter(first, "first");
        lora.SetActiveAdapter("first");
        Assert.True(served.Forward(x).Equals(firstOutput));
    }

    [Fact]
    public void Modules_to_save_train_a_copy_and_leave_the_original_frozen()
    {
        using var model = new TinyModel();
        var head = (Linear)model.get_submodule("lm_head")!;
        var original = head.weight;
        var originalValue = original.clone();
        var options = Lora.Options();
        options.ModulesToSave = ["lm_head"];
        using var adapter = Lora.Attach(model, options);
        Assert.IsType<Linear>(model.get_submodule("lm_head")); // same module, parameters swapped
        Assert.NotSame(original, head.weight);
        Assert.True(head.weight.requires_grad);
        Assert.False(original.requires_grad);
        Assert.Contains(head.weight, adapter.ParameterGroups(1, 0).SelectMany(g => g.Parameters));

        using (torch.no_grad()) head.weight.add_(1.0);
        adapter.Enabled = false;
        Assert.Same(original, head.weight);
        Assert.True(original.Equals(originalValue));
        adapter.Enabled = true;
        Assert.Equal(TinyModel.Vocab * TinyModel.DefaultHidden * 2 + model.parameters().Where(p => !ReferenceEquals(p, head.weight)).Sum(p => p.numel()),
            adapter.ModelParameterCount);
    }

    [Fact]
    public void Modules_to_save_swap_an_embedding_table_and_loraplus_gives_it_its_own_lr()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        var embedding = (Embedding)model.get_submodule("model.embed_tokens")!;
        var original = embedding.named_parameters().Single().parameter;
        var options = Lora.Options();
        options.ModulesToSave = ["embed_tokens"];
        options.LoraplusLrRatio = 16;
        using var adapter = Lora.Attach(model, options);
        var copy = embedding.named_parameters().Single().parameter;
        Assert.NotSame(original, copy);
        Assert.True(copy.requires_grad);
        Assert.False(original.requires_grad);
        var group = adapter.ParameterGroups(1e-3, 0).Single(g => g.Name == "embedding");
        Assert.Same(copy, Assert.Single(group.Parameters));

        using (torch.no_grad()) copy.add_(1.0);                 // the copy is what forward uses
        Assert.False(model.Forward(x).allclose(baseline, 1e-3, 1e-3));
        adapter.Enabled = false;
        Assert.Same(original, embedding.named_parameters().Single().parameter);
        Assert.True(model.Forward(x).Equals(baseline));
    }
}
