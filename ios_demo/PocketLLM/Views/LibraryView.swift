import PocketLLMCore
import SwiftUI
import UniformTypeIdentifiers

/// The root: the app's bundles, import from Files, and the way into a bundle.
struct ContentView: View {
    @Environment(AppModel.self) private var model

    var body: some View {
        NavigationStack {
            LibraryView()
                .navigationDestination(for: BundleEntry.self) { entry in
                    BundleScreen(entry: entry)
                }
        }
        .onChange(of: model.settings) { model.save() }
        .onChange(of: model.computeUnits) { model.save() }
    }
}

struct LibraryView: View {
    @Environment(AppModel.self) private var model
    @State private var importing = false

    var body: some View {
        List {
            if let error = model.libraryError {
                ErrorView(screen: error, retry: nil)
            }
            ForEach(model.bundles) { entry in
                NavigationLink(value: entry) {
                    BundleRow(entry: entry)
                }
            }
            .onDelete { offsets in
                let doomed = offsets.map { model.bundles[$0] }
                Task {
                    for entry in doomed { await model.delete(entry) }
                }
            }
        }
        .overlay {
            if model.bundles.isEmpty && model.libraryError == nil {
                ContentUnavailableView {
                    Label("No bundles", systemImage: "shippingbox")
                } description: {
                    Text("Export one with `pocketllm export --target coreml` (or executorch), then import the bundle "
                        + "folder from Files, or copy it into PocketLLM's Documents with Finder file sharing.")
                } actions: {
                    Button("Import a bundle folder") { importing = true }
                }
            }
        }
        .overlay(alignment: .bottom) {
            if let message = model.busyMessage {
                ProgressView(message)
                    .padding()
                    .background(.regularMaterial, in: RoundedRectangle(cornerRadius: 12))
                    .padding()
            }
        }
        .navigationTitle("PocketLLM")
        .toolbar {
            ToolbarItem(placement: .topBarTrailing) {
                Button {
                    importing = true
                } label: {
                    Label("Import", systemImage: "square.and.arrow.down")
                }
                .disabled(model.busyMessage != nil)
            }
        }
        .fileImporter(isPresented: $importing, allowedContentTypes: [.folder], allowsMultipleSelection: false) {
            result in
            Task { await model.importFolder(result) }
        }
        .refreshable { await model.refresh() }
        .task { await model.refresh() }
    }
}

struct BundleRow: View {
    let entry: BundleEntry

    var body: some View {
        VStack(alignment: .leading, spacing: 4) {
            Text(entry.name).font(.headline)
            if let summary = entry.summary {
                Text(summary).font(.subheadline).foregroundStyle(.secondary)
                Text(ByteCountFormatter.string(fromByteCount: entry.bytes, countStyle: .file))
                    .font(.caption).foregroundStyle(.secondary)
            }
            if let problem = entry.problem {
                Text(problem).font(.caption).foregroundStyle(.red).lineLimit(3)
            }
        }
        .padding(.vertical, 2)
    }
}
