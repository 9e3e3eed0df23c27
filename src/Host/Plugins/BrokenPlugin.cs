namespace LoRAHub.Host.Plugins;

/// <summary>A plugin (or one method type of it) that was skipped, and why.</summary>
public sealed record BrokenPlugin(string PluginName, string Folder, string Reason);
