using System.Runtime.InteropServices;
using System.Text.Json;
using LoRAHub.Safetensors;
using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.DoRA.Tests;

public class PeftFormatTests
{
    private static JsonElement ReadConfig(string dir) =>
        JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json"))).RootElement;

    [Fact]
    public void Config_is_a_lora_config_with_use_dora_true()
    {
        using var model = new TinyModel();
        var options = Dora.Options(r: 4, alpha: 16);
        options.LoraDropout = 0.05;
        options.DetachNorm = false; // LoRAHub-only options are not written
        using var adapter = Dora.Attach(model, options);
        var dir = Dora.TempDir();
        adapter.Save(dir);
        var c = ReadConfig(dir);
        Assert.Equal("LORA", c.GetProperty("peft_type").GetString());
        Assert.True(c.GetProperty("use_dora").GetBoolean());
        Assert.Equal(4, c.GetProperty("r").GetInt32());
        Assert.Equal(16, c.GetProperty("lora_alpha").GetInt32());
        Assert.Equal(0.05, c.GetProperty("lora_dropout").GetDouble());
        Assert.Equal(["q_proj", "v_proj"], c.GetProperty("target_modules").EnumerateArray().Select(e => e.GetString()));
        Assert.False(c.GetProperty("use_rslora").GetBoolean());
        var keys = c.EnumerateObject().Select(p => p.Name).ToList();
        Assert.Equal(keys.Order(StringComparer.Ordinal), keys);
        Assert.DoesNotContain(keys, k => k.Contains("detach", StringComparison.OrdinalIgnoreCase) || k.Contains("norm_method", StringComparison.OrdinalIgnoreCase));
    }

    [Fact]
    public void Safetensors_keys_are_exactly_peft_names_with_the_magnitude_vector()
    {
        using var model = new TinyModel();
        using var adapter = Dora.Attach(model, Dora.Options(r: 4, targets: new[] { "q_proj" }));
        var dir = Dora.TempDir();
        adapter.Save(dir);
        using var file = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
        var tensors = file.Tensors.ToDictionary(t => t.Name);
        Assert.Equal(
            [
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
                "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector",
            ],
            tensors.Keys.Order(StringComparer.Ordinal));
        Assert.All(tensors.Values, t => Assert.Equal(SafetensorsDType.F32, t.DType));
        Assert.Equal([(long)TinyModel.DefaultHidden], tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"].Shape);
    }

    [Fact]
    public void Save_then_load_reproduces_outputs_exactly()
    {
        var x = TinyModel.Batch();
        var dir = Dora.TempDir();
        Tensor expected;
        using (var model = new TinyModel(bias: true))
        {
            var options = Dora.Options(targets: "all-linear");
            options.ModulesToSave = ["lm_head"];
            options.RankPattern = new() { ["o_proj"] = 2 };
            using var adapter = Dora.Attach(model, options);
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
        using var fresh = new TinyModel(bias: true);
        var baseline = fresh.Forward(x);
        using var loaded = (LoraAdapter)new DoraMethod().Load(fresh, dir);
        Assert.IsType<DoraVariant>(loaded.Layers[Dora.Q0].Variant("default"));
        Assert.True(fresh.Forward(x).Equals(expected));
        Assert.False(expected.allclose(baseline, 1e-4, 1e-4));
        loaded.Enabled = false;
        Assert.True(fresh.Forward(x).Equals(baseline));
    }

    [Fact]
    public void The_lora_method_refuses_a_dora_folder_and_the_dora_method_a_lora_folder()
    {
        var doraDir = Dora.TempDir();
        using (var model = new TinyModel())
        using (var adapter = Dora.Attach(model, Dora.Options()))
            adapter.Save(doraDir);
        using (var model = new TinyModel())
        {
            var e = Assert.Throws<AdapterConfigurationException>(() => new LoraMethod().Load(model, doraDir));
            Assert.Contains("use_dora", e.Message);
            Assert.Contains("\"dora\" method", e.Message);
            Assert.IsType<Linear>(model.get_submodule(Dora.Q0));
        }

        var loraDir = Dora.TempDir();
        using (var model = new TinyModel())
        using (var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions { TargetModules = new[] { "q_proj" } }))
            adapter.Save(loraDir);
        using (var model = new TinyModel())
        {
            var e = Assert.Throws<AdapterConfigurationException>(() => new DoraMethod().Load(model, loraDir));
            Assert.Contains("\"lora\" method", e.Message);
            Assert.IsType<Linear>(model.get_submodule(Dora.Q0));
        }
    }

    [Fact]
    public void A_file_without_the_magnitude_vector_is_rejected_without_touching_the_model()
    {
        var dir = Dora.TempDir();
        using (var model = new TinyModel())
        using (var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions { TargetModules = new[] { "q_proj" } }))
            adapter.Save(dir);
        var config = Path.Combine(dir, "adapter_config.json");
        File.WriteAllText(config, File.ReadAllText(config).Replace("\"use_dora\": false", "\"use_dora\": true"));
        using var fresh = new TinyModel();
        var e = Assert.Throws<InvalidDataException>(() => new DoraMethod().Load(fresh, dir));
        Assert.Contains("lora_magnitude_vector", e.Message);
        Assert.IsType<Linear>(fresh.get_submodule(Dora.Q0));
    }

    [Fact]
    public void A_hand_written_peft_dora_adapter_gives_m_times_V_over_norm()
    {
        const int r = 2, d = TinyModel.DefaultHidden;
        var a = Enumerable.Range(0, r * d).Select(i => (float)Math.Sin(i + 1) * 0.3f).ToArray();   // A: r×in
        var b = Enumerable.Range(0, d * r).Select(i => (float)Math.Cos(i * 0.7) * 0.2f).ToArray(); // B: out×r
        var m = Enumerable.Range(0, d).Select(i => 0.5f + 0.1f * i).ToArray();
        var dir = Dora.TempDir();
        const string prefix = "base_model.model.model.layers.0.self_attn.q_proj.";
        SafetensorsWriter.Write(Path.Combine(dir, "adapter_model.safetensors"),
        [
            Entry(prefix + "lora_A.weight", [r, d], a),
            Entry(prefix + "lora_B.weight", [d, r], b),
            Entry(prefix + "lora_magnitude_vector", [d], m),
        ], new Dictionary<string, string> { ["format"] = "pt" });
        File.WriteAllText(Path.Combine(dir, "adapter_config.json"), """
            {
              "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "somewhere/tiny", "bias": "none",
              "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true, "layers_pattern": null,
              "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 16, "lora_dropout": 0.0,
              "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null, "peft_type": "LORA",
              "peft_version": "0.17.1", "r": 2, "rank_pattern": {}, "revision": null,
              "target_modules": "model\\.layers\\.0\\.self_attn\\.q_proj", "task_type": "CAUSAL_LM", "use_dora": true, "use_rslora": false
            }
            """);

        using var model = new TinyModel();
        using var adapter = (LoraAdapter)new DoraMethod().Load(model, dir);
        model.eval();
        var layer = adapter.Layers[Dora.Q0];
        var w = ((Linear)layer.base_layer).weight.data<float>().ToArray(); // out×in
        var x = Enumerable.Range(0, d).Select(i => (i - 3) * 0.25).ToArray();
        const double s = 16.0 / r;
        var expected = new float[d];
        for (var o = 0; o < d; o++)
        {
            var v = new double[d];
            for (var i = 0; i < d; i++)
            {
                v[i] = w[o * d + i];
                for (var k = 0; k < r; k++) v[i] += s * b[o * r + k] * a[k * d + i];
            }
            var norm = Math.Sqrt(v.Sum(e => e * e));
            expected[o] = (float)(m[o] / norm * v.Select((e, i) => e * x[i]).Sum());
        }
        var y = layer.forward(torch.tensor(x.Select(e => (float)e).ToArray(), [1, d]));
        Assert.True(y.allclose(torch.tensor(expected, [1, d]), 1e-5, 1e-5), y.str());
    }

    private static SafetensorsEntry Entry(string name, long[] shape, float[] data)
    {
        var bytes = MemoryMarshal.AsBytes(data.AsSpan()).ToArray();
        return new SafetensorsEntry(name, SafetensorsDType.F32, shape, bytes.Length, s => s.Write(bytes));
    }

    [Fact]
    public void Hot_swap_keeps_dora_and_refuses_a_plain_lora_folder_under_a_dora_name()
    {
        var x = TinyModel.Batch();
        var first = Dora.TempDir();
        var second = Dora.TempDir();
        var plain = Dora.TempDir();
        Tensor secondOutput;
        using (var model = new TinyModel())
        using (var adapter = Dora.Attach(model, Dora.Options(init: LoraInit.Random)))
            adapter.Save(first);
        using (var model = new TinyModel())
        {
            torchx.manual_seed(42);
            using var adapter = Dora.Attach(model, Dora.Options(alpha: 32, init: LoraInit.Random));
            Dora.PerturbMagnitudes(adapter);
            adapter.Save(second);
            secondOutput = model.Forward(x);
        }
        using (var model = new TinyModel())
        using (var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions { TargetModules = new[] { "q_proj", "v_proj" } }))
            adapter.Save(plain);

        using var served = new TinyModel();
        using var dora = (LoraAdapter)new DoraMethod().Load(served, first);
        dora.LoadAdapter(second, "default");
        Assert.True(served.Forward(x).Equals(secondOutput));
        Assert.Throws<AdapterConfigurationException>(() => dora.LoadAdapter(plain, "default"));
        // A plain LoRA folder loads beside the DoRA adapter under a new name.
        dora.LoadAdapter(plain, "plain");
        Assert.Null(dora.Layers[Dora.Q0].Variant("plain"));
    }
}
