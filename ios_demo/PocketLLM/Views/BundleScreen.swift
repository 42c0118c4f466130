import PocketLLMCore
import SwiftUI

/// One bundle: pick the target and compute units, verify and load, then chat.
struct BundleScreen: View {
    let entry: BundleEntry
    @Environment(AppModel.self) private var model

    var body: some View {
        // A ZStack, not a Group: modifiers on a Group apply to each child, so onDisappear would fire on every
        // phase change.
        ZStack {
            switch model.phase {
            case .ready:
                ChatView()
            case .idle:
                LoadOptionsView()
            case .verifying(let progress):
                VerifyingView(progress: progress)
            case .loading(let message):
                VStack(spacing: 16) {
                    ProgressView()
                    Text(message).multilineTextAlignment(.center).foregroundStyle(.secondary)
                    Button("Cancel", role: .cancel) { model.cancelLoad() }
                }
                .padding()
            case .failed(let screen):
                ScrollView {
                    ErrorView(screen: screen) { model.phase = .idle }
                        .padding()
                }
            }
        }
        .navigationTitle(entry.name)
        .navigationBarTitleDisplayMode(.inline)
        .onAppear {
            if model.selected != entry { model.open(entry) }
        }
        .onDisappear {
            // Leaving the bundle frees the model (NavigationStack pops this screen).
            if model.selected == entry { model.close() }
        }
    }
}

struct LoadOptionsView: View {
    @Environment(AppModel.self) private var model

    var body: some View {
        @Bindable var model = model
        Form {
            if let manifest = model.manifest {
                Section("Bundle") {
                    LabeledContent("Model", value: "\(manifest.architecture) (\(manifest.model.numLayers) layers)")
                    LabeledContent("Weights", value: manifest.quantization.scheme)
                    LabeledContent("Context", value: "\(manifest.model.maxContext) tokens")
                    if let generator = manifest.generator {
                        LabeledContent("Exported by", value: "\(generator.name) \(generator.version)")
                    }
                }
                Section {
                    Picker("Runtime", selection: $model.target) {
                        ForEach(manifest.targets.available) { kind in
                            Text(kind.displayName).tag(kind)
                        }
                    }
                    .pickerStyle(.segmented)
                    if model.target == .coreml {
                        Picker("Compute units", selection: $model.computeUnits) {
                            ForEach(ComputeUnits.allCases) { units in
                                Text(units.displayName).tag(units)
                            }
                        }
                    } else if let executorch = manifest.targets.executorch {
                        let missing = model.kernels.missing(for: executorch)
                        if missing.isEmpty {
                            Text(executorch.requiresKernels.isEmpty
                                ? "Stock ExecuTorch runs this program."
                                : "Uses the pocketllm kernels this build links.")
                                .font(.footnote).foregroundStyle(.secondary)
                        } else {
                            Text("This build lacks \(missing.joined(separator: ", ")): build the app with "
                                + "\(KernelCheck.buildScript).")
                                .font(.footnote).foregroundStyle(.red)
                        }
                    }
                } header: {
                    Text("Run with")
                }
                Section {
                    Button("Verify and load") { model.verifyAndLoad() }
                } footer: {
                    Text("Every file's sha256 is checked against manifest.json before the model loads.")
                }
            }
            if let notice = model.notice {
                Section { Text(notice).font(.footnote) }
            }
        }
    }
}

struct VerifyingView: View {
    let progress: VerificationProgress
    @Environment(AppModel.self) private var model

    var body: some View {
        VStack(spacing: 16) {
            ProgressView(value: progress.fraction) {
                Text("Verifying sha256 of \(progress.filesTotal) files")
            } currentValueLabel: {
                Text("\(ByteCountFormatter.string(fromByteCount: progress.bytesDone, countStyle: .file)) of "
                    + ByteCountFormatter.string(fromByteCount: progress.bytesTotal, countStyle: .file))
            }
            if !progress.file.isEmpty {
                Text(progress.file).font(.caption.monospaced()).foregroundStyle(.secondary).lineLimit(1)
            }
            Button("Cancel", role: .cancel) { model.cancelLoad() }
        }
        .padding()
    }
}

struct ErrorView: View {
    let screen: ErrorScreen
    let retry: (() -> Void)?

    var body: some View {
        VStack(alignment: .leading, spacing: 10) {
            Label(screen.title, systemImage: symbol)
                .font(.headline)
                .foregroundStyle(.red)
            Text(screen.message).font(.callout).textSelection(.enabled)
            Text(screen.hint).font(.footnote).foregroundStyle(.secondary)
            if let retry {
                Button("Back", action: retry).buttonStyle(.bordered)
            }
        }
        .frame(maxWidth: .infinity, alignment: .leading)
    }

    private var symbol: String {
        switch screen.kind {
        case .noBundle: return "shippingbox"
        case .badBundle, .badHash: return "exclamationmark.shield"
        case .missingKernels: return "cpu"
        case .outOfMemory: return "memorychip"
        case .loadFailed, .runFailed, .other: return "exclamationmark.triangle"
        }
    }
}
