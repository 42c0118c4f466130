import org.jetbrains.kotlin.gradle.dsl.JvmTarget

plugins {
    alias(libs.plugins.android.application)
    alias(libs.plugins.kotlin.android)
    alias(libs.plugins.kotlin.compose)
}

// ExecuTorch: the AAR built with pocketllm's kernels when present (scripts/build_executorch_aar.sh writes it; arm64
// only), else the stock runtime from Maven Central. The app reads which one it got from BuildConfig and from the
// AAR's assets/pocketllm_kernels.json (the kernels it can run).
val localAar: File = file("libs/executorch.aar")
val useLocalAar: Boolean = localAar.isFile
val executorchVersion: String = libs.versions.executorch.get()
logger.lifecycle(
    if (useLocalAar) "pocketllm: ExecuTorch from ${localAar.path} (custom runtime with pocketllm kernels)"
    else "pocketllm: ExecuTorch $executorchVersion from Maven Central (stock runtime: no pocketllm kernels)"
)

android {
    namespace = "org.pocketllm.demo"
    compileSdk = libs.versions.compileSdk.get().toInt()

    defaultConfig {
        applicationId = "org.pocketllm.demo"
        minSdk = libs.versions.minSdk.get().toInt()
        targetSdk = libs.versions.targetSdk.get().toInt()
        versionCode = 1
        versionName = "0.2.0"
        buildConfigField("String", "EXECUTORCH_VERSION", "\"$executorchVersion\"")
        buildConfigField(
            "String", "EXECUTORCH_SOURCE",
            if (useLocalAar) "\"app/libs/executorch.aar\"" else "\"Maven org.pytorch:executorch-android:$executorchVersion\""
        )
        ndk {
            abiFilters += if (useLocalAar) listOf("arm64-v8a") else listOf("arm64-v8a", "x86_64")
        }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
            signingConfig = signingConfigs.getByName("debug")  // a demo: installable without a release key
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    buildFeatures {
        compose = true
        buildConfig = true
    }
    packaging {
        resources.excludes += "/META-INF/{AL2.0,LGPL2.1}"
    }
}

kotlin {
    compilerOptions { jvmTarget.set(JvmTarget.JVM_17) }
}

dependencies {
    implementation(project(":core"))
    implementation(libs.androidx.core.ktx)
    implementation(libs.androidx.lifecycle.runtime.ktx)
    implementation(libs.androidx.lifecycle.runtime.compose)
    implementation(libs.androidx.lifecycle.viewmodel.compose)
    implementation(libs.androidx.activity.compose)
    implementation(platform(libs.androidx.compose.bom))
    implementation(libs.androidx.compose.ui)
    implementation(libs.androidx.compose.ui.graphics)
    implementation(libs.androidx.compose.ui.tooling.preview)
    implementation(libs.androidx.compose.material3)
    implementation(libs.androidx.compose.material.icons.core)
    implementation(libs.kotlinx.coroutines.android)
    if (useLocalAar) {
        implementation(files(localAar))
        implementation(libs.fbjni)
        implementation(libs.soloader.nativeloader)
    } else {
        implementation(libs.executorch.android)
    }
    debugImplementation(libs.androidx.compose.ui.tooling)
}
